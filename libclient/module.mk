# libclient/: libliteattn.so (public API in include/liteattn.h, exports limited by
# liteattn.map), liteattnctl and liteattn-demo (libclient/tools/).
CLIENT_SRCS := $(wildcard libclient/*.c)
CLIENT_OBJS := $(call objs,$(CLIENT_SRCS))
$(CLIENT_OBJS): ALL_CFLAGS += -fvisibility=hidden
CLIENT_LIBS := $(PROTOBUF_C_LIBS) -ldl $(LDLIBS_BASE)

# The framing and generated protocol code, compiled again with hidden visibility for the .so:
# their la_frame* names would otherwise match the version script's la_* and leak out.
CLIENT_PROTO_OBJS := $(BUILD)/obj/libclient/proto/frame.o $(BUILD)/obj/libclient/proto/liteattn.pb-c.o
$(BUILD)/obj/libclient/proto/frame.o: proto/frame.c | $(PROTO_GEN_H)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $< (hidden)")
	$(Q)$(CC) $(ALL_CFLAGS) -fvisibility=hidden -c $< -o $@
$(BUILD)/obj/libclient/proto/liteattn.pb-c.o: $(BUILD)/proto/liteattn.pb-c.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $< (hidden)")
	$(Q)$(CC) $(ALL_CFLAGS) -fvisibility=hidden -c $< -o $@

LA_SO := $(BUILD)/libliteattn.so.$(LA_VERSION)
$(LA_SO): $(CLIENT_OBJS) $(CLIENT_PROTO_OBJS) libclient/liteattn.map
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -shared -Wl,-soname,libliteattn.so.$(LA_SOVERSION) \
		-Wl,--version-script=libclient/liteattn.map -Wl,--no-undefined \
		-o $@ $(CLIENT_OBJS) $(CLIENT_PROTO_OBJS) $(CLIENT_LIBS)
	$(Q)ln -sf libliteattn.so.$(LA_VERSION) $(BUILD)/libliteattn.so.$(LA_SOVERSION)
	$(Q)ln -sf libliteattn.so.$(LA_SOVERSION) $(BUILD)/libliteattn.so

# Tools link the shared library, found next to them ($ORIGIN) in the build tree, and in
# ../lib or ../lib/<multiarch> of an installed prefix outside the loader's path.
TOOL_LDFLAGS := -L$(BUILD) -Wl,-rpath,'$$ORIGIN' -Wl,-rpath,'$$ORIGIN/../lib' \
	-Wl,-rpath,'$$ORIGIN/../lib/$(LA_MULTIARCH)'

$(BUILD)/liteattnctl: $(BUILD)/obj/libclient/tools/liteattnctl.o $(LA_SO)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $< $(TOOL_LDFLAGS) -lliteattn $(LDLIBS_BASE)

# The demo also links the CPU reference, to measure its error against dense attention.
$(BUILD)/liteattn-demo: $(BUILD)/obj/libclient/tools/demo.o $(LA_SO) $(KERNEL_LIB)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $< $(KERNEL_LIB) $(TOOL_LDFLAGS) -lliteattn $(CUDA_LIBS) \
		$(LDLIBS_BASE)

ALL_TARGETS += $(if $(CLIENT_SRCS),$(LA_SO)) \
	$(if $(wildcard libclient/tools/liteattnctl.c),$(BUILD)/liteattnctl) \
	$(if $(wildcard libclient/tools/demo.c),$(BUILD)/liteattn-demo)
