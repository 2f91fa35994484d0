"""The chat template every tokenizer is rendered with: its own, or Meta's Llama 2 template.

Training (data/chat.py), evaluation and serving (serving/ingress.py) render conversations with
`tokenizer.apply_chat_template`, so a base whose template differs from Llama 2's trains on the
format it serves. A tokenizer that carries no template (e.g. `meta-llama/Llama-2-7b-hf`, the
non-chat base) gets Meta's Llama 2 chat template, the one `meta-llama/Llama-2-*-chat-hf` and the
generated `llama2-tiny` tokenizers carry.
"""

from __future__ import annotations

# Meta's template for meta-llama/Llama-2-*-chat-hf: system prompt folded into the first user
# turn, `<s>[INST] ... [/INST] answer </s>` per turn, roles must alternate.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def ensure_chat_template(tokenizer):
    """`tokenizer`, given Meta's Llama 2 chat template when it carries none of its own."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text of `messages` awaiting the next assistant answer: what serving tokenises for a
    chat request (`add_special_tokens=False`) and the prefix training masks before each answer."""
    return ensure_chat_template(tokenizer).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
