# bench/: bench_ref times one call of the CPU reference (kernels/ref.c); `make bench` runs it.
# The GPU benchmarks (bench_gpu.py, run_gpu.sh) run on the GPU machine and need no build here.
$(BUILD)/obj/bench/%.o: ALL_CFLAGS += $(ALL_INC)

$(BUILD)/bench_ref: $(BUILD)/obj/bench/bench_ref.o $(KERNEL_LIB)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(CUDA_LIBS) $(LDLIBS_BASE)

ALL_TARGETS += $(BUILD)/bench_ref

bench: $(BUILD)/bench_ref
	$(BUILD)/bench_ref --threads $(or $(THREADS),$(shell nproc))

# bench_daemon: one call through liteattnd against the same call made directly (CPU or CUDA).
$(BUILD)/bench_daemon: $(BUILD)/obj/bench/bench_daemon.o $(LA_SO) $(KERNEL_LIB)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(KERNEL_LIB) $(TOOL_LDFLAGS) -lliteattn $(CUDA_LIBS) $(LDLIBS_BASE)

ALL_TARGETS += $(BUILD)/bench_daemon

# bench_direct: liteattn-demo's generation without a daemon (the CPU reference in-process).
$(BUILD)/obj/bench/bench_direct.o: ALL_CFLAGS += -Ilibclient/tools
$(BUILD)/bench_direct: $(BUILD)/obj/bench/bench_direct.o $(SIM_OBJ) $(KERNEL_LIB) $(COMMON_LIB)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(CUDA_LIBS) $(LDLIBS_BASE)

ALL_TARGETS += $(BUILD)/bench_direct

# bench_throughput: several client processes, a session each, against the same work from one
# process (through the daemon, and direct kernel calls). GPU only.
$(BUILD)/bench_throughput: $(BUILD)/obj/bench/bench_throughput.o $(LA_SO) $(KERNEL_LIB)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(KERNEL_LIB) $(TOOL_LDFLAGS) -lliteattn $(CUDA_LIBS) $(LDLIBS_BASE)

ALL_TARGETS += $(BUILD)/bench_throughput

# ipc_probe (CUDA builds only): the attention kernel and two memory kernels on every kind of
# memory a client can hand the daemon (own cudaMalloc, CUDA IPC imports, VMM allocations by
# fd), in two processes. Runs on the GPU machine: $(BUILD)/ipc_probe --help.
ifeq ($(HAVE_CUDA),1)
# Its own object rule: the probe needs only the kernels' headers, so that it builds where
# protoc-c is absent (the GPU machine), as the kernels do.
$(BUILD)/obj/bench/ipc_probe.o: bench/ipc_probe.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(ALL_CFLAGS) $(KERNEL_INC) -c $< -o $@

$(BUILD)/ipc_probe: $(BUILD)/obj/bench/ipc_probe.o $(BUILD)/obj/bench/probe_kernels.cu.o \
		$(KERNEL_LIB)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(CUDA_LIBS) -ldl $(LDLIBS_BASE)

ALL_TARGETS += $(BUILD)/ipc_probe
endif
