# Two commands do all the set-up on a fresh machine (Python 3.11+ needed):
#   make lab    create .venv, install the course, open the notebooks in JupyterLab
#   make test   create .venv, install the course, run the unit tests and every notebook
# and three more check the course beyond this machine's defaults (CI runs all three):
#   make test-kernels       the notebooks again under AVX2 kernels, then under scalar ones (as on ARM)
#   make test-other-images  the notebooks' asserts on two altered copies of CIFAR-10's images
#   make test-oldest        the oldest torch, torchvision and fastai admitted, in .venv-oldest
VENV ?= .venv
OLDEST_VENV ?= .venv-oldest
PYTHON ?= python3
BIN = $(VENV)/bin
OLDEST_BIN = $(OLDEST_VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[lab,test]"
	touch $@

$(OLDEST_BIN)/.releases: .ci/oldest-versions.txt
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/python -m pip install -q -r .ci/oldest-versions.txt
	touch $@

$(OLDEST_BIN)/.installed: pyproject.toml $(OLDEST_BIN)/.releases
	$(OLDEST_BIN)/python -m pip install -q -c .ci/oldest-versions.txt -e ".[test]"
	touch $@

.PHONY: lab test test-kernels test-other-images test-oldest
lab: $(BIN)/.installed
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

test: $(BIN)/.installed
	$(BIN)/python -m pytest --nbval tests notebooks

# other CPUs' kernels and summation orders: every committed output must hold there too
test-kernels: $(BIN)/.installed
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -p no:cacheprovider --nbval notebooks
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -p no:cacheprovider --nbval notebooks

# other pixels (in Colab the original CIFAR-10, not the JPEG copy): every assert still holds
CIFAR10_ARCHIVE ?= $(or $(ANNOTATED_RESNET_CIFAR10),../shared/data/cifar10-jpeg.tar.gz)
data/cifar10-%.tar.gz: tools/other_images.py $(BIN)/.installed
	$(BIN)/python tools/other_images.py $* $(CIFAR10_ARCHIVE) $@

test-other-images: data/cifar10-jpeg50.tar.gz data/cifar10-sharpened.tar.gz
	for copy in $^; do \
		ANNOTATED_RESNET_CIFAR10=$(CURDIR)/$$copy $(BIN)/python -m pytest -p no:cacheprovider --nbval-lax notebooks || exit 1; \
	done

# outputs may differ between releases; every cell still runs and every assert still holds
test-oldest: $(OLDEST_BIN)/.installed
	$(OLDEST_BIN)/python -m pytest -p no:cacheprovider --nbval-lax tests notebooks
