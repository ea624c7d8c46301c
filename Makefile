# Set-up, tests, benchmarks and the demo. Everything runs inside .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SYSDEPS := libusb-1.0-0 libgl1 libegl1 libosmesa6
export PYOPENGL_PLATFORM ?= osmesa

.PHONY: install sysdeps test lint bench demo clean

install: $(VENV)/.installed

# open3d needs libusb at import time; pyrender needs OSMesa (CPU) or EGL (GPU) for offscreen rendering.
sysdeps:
	@missing=""; for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing system libraries; run: sudo apt-get install -y$$missing"; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml Makefile
	$(MAKE) sysdeps
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# pyrender pins PyOpenGL 3.1.0, which lacks OSMesaCreateContextAttribs and cannot render headless;
	# 3.1.7+ works with pyrender's code, so install it after pyrender (pip warns about the pin; that is expected).
	$(BIN)/pip install -q 'PyOpenGL>=3.1.7'
	touch $@

lint: install
	$(BIN)/ruff check wt_datagen wt_model tests

test: install lint
	$(BIN)/pytest -q tests

bench: install
	$(BIN)/python -m tests.bench

# Two views and a clip of the demo shards, pictured as contact sheets and (rerun-sdk installed) logged to Rerun.
DEMO_SHOW := box_in_box__box_in_box_glb_v0000 mug__mug_obj_v0001 wobble_c000_tracks

demo: install
	$(BIN)/wt-datagen make-assets demo/assets --sequences
	$(BIN)/wt-datagen render demo/assets --config render_configs/debug.yaml --out demo/shards
	$(BIN)/wt-datagen inspect demo/shards --validate
	@rrd=""; if $(BIN)/python -c "import rerun" 2>/dev/null; then rrd="--rerun demo/demo.rrd"; \
	else echo "rerun-sdk not installed: no demo/demo.rrd (pip install 'world-tracing[rerun]')"; fi; \
	$(BIN)/wt-datagen inspect demo/shards --show $(DEMO_SHOW) --out demo/sheets $$rrd >/dev/null && \
	echo "open: $(DEMO_SHOW:%=demo/sheets/%.png)" && \
	if [ -n "$$rrd" ]; then echo "open: rerun demo/demo.rrd   (the same samples in 3D; scrub the frame timeline)"; fi

clean:
	rm -rf $(VENV) demo
