# engine/: the transport-free core of liteattnd (sessions, buffers, backends, the CUDA worker
# and IPC imports). It sees kernels/ and the bottom layer only: no socket, no libuv, no
# protobuf. Produces $(BUILD)/libengine.a, which tests and benchmarks drive in-process.
ENGINE_SRCS := $(wildcard engine/*.c)
ENGINE_OBJS := $(call objs,$(ENGINE_SRCS))
ENGINE_LIB := $(BUILD)/libengine.a
ENGINE_LIBS := $(CUDA_LIBS) $(LDLIBS_BASE)

$(BUILD)/obj/engine/%.o: ALL_CFLAGS += $(ENGINE_INC)

$(ENGINE_LIB): $(ENGINE_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^
