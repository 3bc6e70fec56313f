# libclient/: libliteattn.so (public API in include/liteattn.h, exports limited by
# liteattn.map), liteattnctl and liteattn-demo (libclient/tools/).
CLIENT_SRCS := $(wildcard libclient/*.c)
CLIENT_OBJS := $(call objs,$(CLIENT_SRCS))
$(CLIENT_OBJS): ALL_CFLAGS += -fvisibility=hidden
CLIENT_LIBS := $(PROTOBUF_C_LIBS) -ldl $(LDLIBS_BASE)

# The framing, the generated protocol code and the code names go in as they are built for the
# daemon: their names (frame_*, liteattn__*, codes_*) are not la_*, so the version script keeps
# them local.
CLIENT_PROTO_OBJS := $(PROTO_OBJS) $(COMMON_OBJS)
$(CLIENT_OBJS): ALL_CFLAGS += $(CLIENT_INC)
$(BUILD)/obj/libclient/tools/%.o: ALL_CFLAGS += $(CLIENT_INC) $(KERNEL_INC)

LA_SO := $(BUILD)/libliteattn.so.$(LA_VERSION)
$(LA_SO): $(CLIENT_OBJS) $(CLIENT_PROTO_OBJS) libclient/liteattn.map
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -shared -Wl,-soname,libliteattn.so.$(LA_SOVERSION) \
		-Wl,--version-script=libclient/liteattn.map -Wl,--no-undefined \
		-o $@ $(CLIENT_OBJS) $(CLIENT_PROTO_OBJS) $(CLIENT_LIBS)
	$(Q)ln -sf libliteattn.so.$(LA_VERSION) $(BUILD)/libliteattn.so.$(LA_SOVERSION)
	$(Q)ln -sf libliteattn.so.$(LA_SOVERSION) $(BUILD)/libliteattn.so

# The simulated generation of liteattn-demo, shared with bench/bench_direct.
SIM_OBJ := $(BUILD)/obj/libclient/tools/sim.o

# Tools link the shared library, found next to them ($ORIGIN) in the build tree.
TOOL_LDFLAGS := -L$(BUILD) -Wl,-rpath,'$$ORIGIN' -Wl,-rpath,'$$ORIGIN/../lib'

$(BUILD)/liteattnctl: $(BUILD)/obj/libclient/tools/liteattnctl.o $(LA_SO)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(TOOL_LDFLAGS) -lliteattn $(LDLIBS_BASE)

# The demo links the kernels for la_dtype_size and the half-precision conversions of sim.c.
$(BUILD)/liteattn-demo: $(BUILD)/obj/libclient/tools/demo.o $(SIM_OBJ) $(LA_SO) $(KERNEL_LIB)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(SIM_OBJ) $(KERNEL_LIB) $(TOOL_LDFLAGS) -lliteattn $(CUDA_LIBS) $(LDLIBS_BASE)

ALL_TARGETS += $(if $(CLIENT_SRCS),$(LA_SO)) \
	$(if $(wildcard libclient/tools/liteattnctl.c),$(BUILD)/liteattnctl) \
	$(if $(wildcard libclient/tools/demo.c),$(BUILD)/liteattn-demo)
