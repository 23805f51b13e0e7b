# quant4 tasks. `make demo` and `make test` are the two set-up commands in README.
# Both install first, into the active virtualenv if there is one, else into a project virtualenv .venv made
# with the system's python3 (works on a PEP 668 "externally managed" Python too). The venv sees the system's
# packages, so an installed torch >= 2.6 is used as it is; without one, the pinned CPU build is installed
# (requirements-torch.txt). The install runs again only when the requirements or the kernel sources change
# (stamp file in the venv).
PYTHON ?= python3
ifdef VIRTUAL_ENV
ENV := $(VIRTUAL_ENV)
else
ENV := .venv
endif
PY := $(ENV)/bin/python
STAMP := $(ENV)/.quant4-installed
SOURCES := requirements-dev.txt requirements-torch.txt pyproject.toml setup.py $(wildcard quant4/*.pyx quant4/*.pxi quant4/*.h)
HAS_TORCH := import sys, torch; v = torch.__version__.split("+")[0].split("."); sys.exit((int(v[0]), int(v[1])) < (2, 6))

.PHONY: install demo test test-long bench asan clean quality

$(PY):
	@echo "creating the virtualenv $(ENV) (system packages visible)"
	$(PYTHON) -m venv --system-site-packages $(ENV)

$(STAMP): $(PY) $(SOURCES)
	@echo "installing into $(ENV): torch if none >= 2.6 is importable, the dev requirements, and quant4 with its"
	@echo "Cython kernels (three builds: generic, AVX2, AVX-512; about a minute)"
	@$(PY) -c '$(HAS_TORCH)' 2>/dev/null || $(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) scripts/generate.py

test: install
	$(PY) -m pytest

# longer hypothesis runs (the fast subset runs in `make test`)
test-long: install
	QUANT4_HYPOTHESIS_PROFILE=long $(PY) -m pytest

# the README's quality table: float vs rtn / search / refit / gptq / awq+gptq / tune, g32/64/128, embedded model and
# stories260K; with LLAMA_QUANTIZE=path/to/llama-quantize also llama.cpp's Q4_0 / Q4_1 / Q4_K_M on the same models
# and text, and with LLAMA_IMATRIX=path/to/llama-imatrix each of those again with an importance matrix
quality: install
	$(PY) scripts/eval.py --checkpoint embedded ../shared/models/stories260K/stories260K.bin \
		--method rtn search refit gptq gptq-refine awq-gptq-refine tune --group-size 32 64 128 \
		--json bench_out/quality.json \
		$(if $(LLAMA_QUANTIZE),--llama-quantize $(LLAMA_QUANTIZE),) $(if $(LLAMA_IMATRIX),--llama-imatrix $(LLAMA_IMATRIX),)
	$(if $(LLAMA_QUANTIZE),,@echo "llama.cpp rows skipped: pass LLAMA_QUANTIZE=path/to/llama-quantize")

bench: install
	$(PY) scripts/bench.py

# kernels built with AddressSanitizer and Cython bounds checks, then the kernel tests
asan: install
	rm -rf build quant4/*.so
	QUANT4_SANITIZE=address QUANT4_DEBUG_CYTHON=1 $(PY) setup.py build_ext --inplace -q
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 $(PY) -m pytest tests/test_kernels.py -q -p no:cacheprovider
	rm -rf build quant4/*.so $(STAMP)
	$(MAKE) install

clean:
	rm -rf build *.egg-info quant4/*.so quant4/_kernels*.c $(STAMP)
