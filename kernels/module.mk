# kernels/: the CPU reference (*.c) and the CUDA kernels (*.cu, only when nvcc is present).
# Produces $(BUILD)/libkernels.a.
KERNEL_C_SRCS := $(wildcard kernels/*.c)
KERNEL_CU_SRCS := $(if $(filter 1,$(HAVE_CUDA)),$(wildcard kernels/*.cu))
KERNEL_OBJS := $(call objs,$(KERNEL_C_SRCS) $(KERNEL_CU_SRCS))
KERNEL_LIB := $(BUILD)/libkernels.a

$(KERNEL_LIB): $(KERNEL_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^

# CUDA kernel programs (issue 4). The kernel test links only the kernels, Check and cudart, so
# that it builds (here, and carried to a GPU machine) whatever state the daemon is in; this
# explicit rule takes precedence over the pattern rule of tests/module.mk. The shared library
# is for bench/bench_gpu.py (ctypes: la_attn_fwd_cuda_variant, la_cuda_tile_sizes).
ifeq ($(HAVE_CUDA),1)
$(BUILD)/tests/check_gpu_kernel: $(BUILD)/obj/tests/check_gpu_kernel.o $(KERNEL_LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(CHECK_LIBS) $(CUDA_LIBS) $(LDLIBS_BASE)

$(BUILD)/libla_kernels.so: $(KERNEL_OBJS)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -shared -o $@ $^ $(CUDA_LIBS) $(LDLIBS_BASE)
endif
