# Fresh machine:  make demo   (set up + run the main job: tiny Transformer-XL, ~1 min on CPU)
#                 make demo-finetune   (tiny Llama, structured-sparse fine-tuning)
#                 ARGS='--steps 20' adds arguments to the demos' training command
#                 make test   (set up + run the tests, what .ci/run runs)
PY      ?= python3
VENV    ?= .venv
# The CPU build; on a GPU machine install your CUDA torch into the venv first and set TORCH_PIN=
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo demo-mlp demo-finetune test bench readme-figures

$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(if $(TORCH_PIN),$(VENV)/bin/pip install -q $(TORCH_PIN))
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.ready

demo: setup
	rm -rf runs/demo
	$(VENV)/bin/python launch/train_lm.py --output_dir runs/demo $(ARGS)

# its own directories (runs/finetune, finetune_llm.py's default --output_dir, is the user's)
demo-finetune: setup
	rm -rf runs/demo-finetune
	$(VENV)/bin/python -m ramda_ds.training.tiny_model runs/tiny-llama
	$(VENV)/bin/python launch/finetune_llm.py --model_path runs/tiny-llama --output_dir runs/demo-finetune $(ARGS)

demo-mlp: setup
	$(VENV)/bin/python -m ramda_ds.training.demo

test: setup
	$(VENV)/bin/python -m pytest tests

bench: setup
	$(VENV)/bin/python bench/optimizer_step.py
	$(VENV)/bin/python bench/train_step.py

readme-figures: setup
	$(VENV)/bin/python bench/readme_figures.py
