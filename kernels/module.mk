# kernels/: the CPU reference (*.c) and the CUDA kernels (*.cu, only when nvcc is present).
# Produces $(BUILD)/libkernels.a.
#
# CUDA instances: attn_fwd_hd<D>_<dtype>_<family>.cu, one per (head dim, dtype, family). The
# set is listed here, once, from three make variables (prune with e.g. LA_HEAD_DIMS=128):
#   LA_FAMILIES  sm80 (portable: mma.sync, sm_80 and later) sm90 (Hopper: wgmma/TMA, sm_90a)
#   LA_HEAD_DIMS 64 128
#   LA_DTYPES    bf16 f16
# The sm90 family is built only when CUDA_ARCHS names 90, with the 90a gencode alone; the
# selector (attn_dispatch.cu) learns which instances exist through -DLA_INST_<inst>.
LA_FAMILIES ?= sm80 sm90
LA_HEAD_DIMS ?= 64 128
LA_DTYPES ?= bf16 f16
KERNEL_FAMILIES := $(filter-out $(if $(filter 90,$(CUDA_ARCHS)),,sm90),$(LA_FAMILIES))
KERNEL_INSTANCES := $(foreach f,$(KERNEL_FAMILIES),$(foreach d,$(LA_HEAD_DIMS),$(foreach t,$(LA_DTYPES),$(f)_hd$(d)_$(t))))
inst_src = kernels/attn_fwd_$(word 2,$(subst _, ,$(1)))_$(word 3,$(subst _, ,$(1)))_$(word 1,$(subst _, ,$(1))).cu
KERNEL_INST_SRCS := $(foreach i,$(KERNEL_INSTANCES),$(call inst_src,$(i)))

KERNEL_C_SRCS := $(wildcard kernels/*.c)
KERNEL_CU_SRCS := $(if $(filter 1,$(HAVE_CUDA)),kernels/attn_dispatch.cu kernels/guard.cu $(KERNEL_INST_SRCS))
KERNEL_OBJS := $(call objs,$(KERNEL_C_SRCS) $(KERNEL_CU_SRCS))
KERNEL_LIB := $(BUILD)/libkernels.a

NVCC_EXTRA_attn_dispatch.cu := $(foreach i,$(KERNEL_INSTANCES),-DLA_INST_$(i))
# wgmma and setmaxnreg exist only in sm_90a code, which runs on compute capability 9.0 alone.
$(foreach i,$(filter sm90_%,$(KERNEL_INSTANCES)),$(eval \
  $(BUILD)/obj/$(basename $(call inst_src,$(i))).cu.o: NVCC_GENCODE := -gencode=arch=compute_90a,code=sm_90a))

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
