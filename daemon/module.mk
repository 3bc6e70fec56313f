# daemon/: liteattnd's transport (main, config, log, server, conn, dispatch) over the engine.
# Everything except main.c goes into $(BUILD)/libdaemon.a so that tests and the fuzzers can
# drive the server in-process.
DAEMON_SRCS := $(filter-out daemon/main.c,$(wildcard daemon/*.c))
DAEMON_OBJS := $(call objs,$(DAEMON_SRCS))
DAEMON_LIB := $(BUILD)/libdaemon.a
# Everything below the daemon, in link order.
DAEMON_STACK := $(DAEMON_LIB) $(ENGINE_LIB) $(KERNEL_LIB) $(PROTO_LIB) $(COMMON_LIB)
DAEMON_LIBS := $(UV_LIBS) $(PROTOBUF_C_LIBS) $(SYSTEMD_LIBS) $(CUDA_LIBS) $(LDLIBS_BASE)

$(BUILD)/obj/daemon/%.o: ALL_CFLAGS += $(DAEMON_INC)

$(DAEMON_LIB): $(DAEMON_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^

$(BUILD)/liteattnd: $(BUILD)/obj/daemon/main.o $(DAEMON_STACK)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(DAEMON_LIBS)

ALL_TARGETS += $(if $(wildcard daemon/main.c),$(BUILD)/liteattnd)
