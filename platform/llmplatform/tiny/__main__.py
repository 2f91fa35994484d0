"""`python -m llmplatform.tiny [CACHE_DIR]`: pre-build every llama2-tiny kind, with timings."""

import sys

from llmplatform.tiny.cache import generate_all

if __name__ == "__main__":
    generate_all(sys.argv[1] if len(sys.argv) > 1 else None)
