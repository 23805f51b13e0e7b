# quant4 tasks. `make demo` and `make test` are the two set-up commands in README; both install first.
PY ?= python3

.PHONY: install demo test test-long bench asan clean quality

install:
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .

demo: install
	$(PY) scripts/generate.py

test: install
	$(PY) -m pytest

# longer hypothesis runs (the fast subset runs in `make test`)
test-long: install
	QUANT4_HYPOTHESIS_PROFILE=long $(PY) -m pytest

# the README's quality table: float vs rtn / search / gptq, g32/64/128, embedded model and stories260K
quality: install
	$(PY) scripts/eval.py --checkpoint embedded ../shared/models/stories260K/stories260K.bin \
		--method rtn search gptq gptq-refine --group-size 32 64 128 --json bench_out/quality.json

bench: install
	$(PY) scripts/bench.py

# kernels built with AddressSanitizer and Cython bounds checks, then the kernel tests
asan:
	$(PY) -m pip install -q -r requirements-dev.txt
	rm -rf build quant4/*.so
	QUANT4_SANITIZE=address QUANT4_DEBUG_CYTHON=1 $(PY) setup.py build_ext --inplace -q
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 $(PY) -m pytest tests/test_kernels.py -q -p no:cacheprovider
	rm -rf build quant4/*.so
	$(PY) -m pip install -q --no-build-isolation -e .

clean:
	rm -rf build *.egg-info quant4/*.so quant4/_kernels*.c
