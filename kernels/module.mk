# kernels/: the CPU reference (*.c) and the CUDA kernels (*.cu, only when nvcc is present).
# Produces $(BUILD)/libkernels.a.
KERNEL_C_SRCS := $(wildcard kernels/*.c)
KERNEL_CU_SRCS := $(if $(filter 1,$(HAVE_CUDA)),$(wildcard kernels/*.cu))
KERNEL_OBJS := $(call objs,$(KERNEL_C_SRCS) $(KERNEL_CU_SRCS))
KERNEL_LIB := $(BUILD)/libkernels.a

$(KERNEL_LIB): $(KERNEL_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^
