# The two commands of the README. Both create .venv when it is missing and are safe to run again.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev,dmcvb]'
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no test; that is reported, not treated as a crash.
test: $(STAMP)
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

demo: $(STAMP)
	$(PY) VRNN/main.py --env cheetah-run --preset cpu --minutes 25

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Speed figures (benchmarks/results.json and the README's Performance table); quality per minute is
# benchmarks/quality.py (the ablation ladder, minutes per configuration).
bench: $(STAMP)
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
