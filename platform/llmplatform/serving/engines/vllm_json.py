"""`response_format: json_object` closed within `max_tokens` on the vllm engine.

vLLM's structured outputs (xgrammar, no whitespace: `engine_args`) keep the text a JSON object's
prefix, but nothing makes the object end: a model may write one string until `max_tokens` cuts
it. `JsonObjectCloser` is a vLLM logits processor (loaded by vLLM in its engine process, named in
`engine_args`) that adds the hf engine's guarantee (json_constraint): it follows each json_object
request's text with the JSON automaton and, once the tokens left could run short
(`closer` length + the most a token can lengthen it), keeps only tokens after which the object
still closes in time, one token before `max_tokens` so that end-of-sequence follows it and the
finish_reason is `stop` (checked among the `CANDIDATES` likeliest the grammar allows; when none
does, the tokens that start the shortest completion). vLLM applies the grammar's mask first. This is the V1 model runner's processor interface (vLLM's CPU
backend); `engine_args` names it on CPU only.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from llmplatform.serving.engines import json_constraint

CANDIDATES = 64
GROWTH_PER_CHAR = 4  # `,` after a value turns the closer `}` into `"":0}`


class _Row:
    def __init__(self, max_tokens: int, out_ids: list[int]):
        self.max_tokens, self.out_ids, self.seen, self.state = max_tokens, out_ids, 0, json_constraint.START


class JsonObjectCloser(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from transformers import AutoTokenizer

        model = vllm_config.model_config
        tok = AutoTokenizer.from_pretrained(model.tokenizer, trust_remote_code=model.trust_remote_code)
        special = set(tok.all_special_ids)
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        self.texts = [None if i in special else json_constraint.piece_text(p) for i, p in enumerate(pieces)]
        self.growth = GROWTH_PER_CHAR * max(len(t) for t in self.texts if t)
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new(params, _prompt, out_ids):
            so = params.structured_outputs
            return _Row(params.max_tokens, out_ids) if so is not None and so.json_object and params.max_tokens else None

        process_dict_updates(self.rows, batch_update, new)

    def _advance(self, row: _Row) -> None:
        for tid in row.out_ids[row.seen:]:
            if row.state is None:
                break
            text = self.texts[tid] if tid < len(self.texts) else None
            if text is None:  # part of a multi-byte character: only inside a string, where the state stays
                row.state = row.state if row.state[1] == "str" else None
            else:
                row.state = json_constraint.feed_text(row.state, text)
        row.seen = len(row.out_ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, row in self.rows.items():
            self._advance(row)
            if row.state is None or json_constraint.is_done(row.state):
                continue  # not text this automaton follows (the grammar still applies) / the grammar ends it
            left = row.max_tokens - len(row.out_ids) - 1  # the last token is kept for end-of-sequence: finish_reason stop
            if len(json_constraint.closer(row.state)) + self.growth < left:
                continue
            scores = logits[index]
            top = torch.topk(scores, min(CANDIDATES, scores.shape[-1]))
            candidates = [int(t) for v, t in zip(top.values.tolist(), top.indices.tolist()) if v != float("-inf")]
            keep = [t for t in json_constraint.closable(row.state, candidates, self.texts, left)
                    if t < scores.shape[-1] and scores[t] != float("-inf")]
            if keep:
                idx = torch.tensor(keep, dtype=torch.long, device=scores.device)
                kept = scores[idx].clone()
                scores.fill_(float("-inf"))
                scores[idx] = kept
        return logits
