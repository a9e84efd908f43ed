# Two commands do all the set-up on a fresh machine (Python 3.11+ needed):
#   make lab    create .venv, install the course, open the notebooks in JupyterLab
#   make test   create .venv, install the course, run the unit tests and every notebook
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[lab,test]"
	touch $@

.PHONY: lab test
lab: $(BIN)/.installed
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

test: $(BIN)/.installed
	$(BIN)/python -m pytest --nbval tests notebooks
