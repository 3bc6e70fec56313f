# daemon/: liteattnd. Everything except main.c goes into $(BUILD)/libdaemon.a so that tests
# and benchmarks can drive the engine and the server in-process.
DAEMON_SRCS := $(filter-out daemon/main.c,$(wildcard daemon/*.c))
DAEMON_OBJS := $(call objs,$(DAEMON_SRCS))
DAEMON_LIB := $(BUILD)/libdaemon.a
DAEMON_LIBS := $(UV_LIBS) $(PROTOBUF_C_LIBS) $(SYSTEMD_LIBS) $(CUDA_LIBS) $(LDLIBS_BASE)

$(DAEMON_LIB): $(DAEMON_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^

# la_strerror() (libclient/errors.c) names the error codes in the daemon's messages too.
$(BUILD)/liteattnd: $(BUILD)/obj/daemon/main.o $(DAEMON_LIB) $(KERNEL_LIB) $(PROTO_LIB) \
		$(BUILD)/obj/libclient/errors.o
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(DAEMON_LIBS)

ALL_TARGETS += $(if $(wildcard daemon/main.c),$(BUILD)/liteattnd)
