# bench/: bench_ref times one call of the CPU reference (kernels/ref.c); `make bench` runs it.
# The GPU benchmarks (bench_gpu.py, run_gpu.sh) run on the GPU machine and need no build here.
$(BUILD)/bench_ref: $(BUILD)/obj/bench/bench_ref.o $(KERNEL_LIB)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(CUDA_LIBS) $(LDLIBS_BASE)

ALL_TARGETS += $(BUILD)/bench_ref

bench: $(BUILD)/bench_ref
	$(BUILD)/bench_ref --threads $(or $(THREADS),$(shell nproc))
