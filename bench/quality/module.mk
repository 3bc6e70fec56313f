# bench/quality/: the toy video DiT quality harness. `make check` runs its CPU smoke mode (tiny
# random-weights model, 2 steps, the CPU backend daemon of this build); without PyTorch it
# prints "quality: skipped: ..." and passes. The GPU runs are in bench/quality/README.md.
check-quality: all
	$(Q)LITEATTN_BUILD_DIR=$(BUILD) LITEATTN_LIB=$(abspath $(BUILD))/libliteattn.so \
		$${PYTHON:-python3} bench/quality/run.py --smoke

check check-python: check-quality
.PHONY: check-quality
