# proto/: the wire protocol (protobuf-c) and framing. Produces $(BUILD)/libproto.a.
$(BUILD)/proto/liteattn.pb-c.c $(BUILD)/proto/liteattn.pb-c.h: proto/liteattn.proto
	@mkdir -p $(BUILD)/proto
	@$(if $(Q),echo "  PROTOC  $<")
	$(Q)$(PROTOC_C) --c_out=$(BUILD)/proto -Iproto $<

PROTO_SRCS := $(BUILD)/proto/liteattn.pb-c.c proto/frame.c
PROTO_OBJS := $(call objs,$(PROTO_SRCS))
PROTO_LIB := $(BUILD)/libproto.a

$(PROTO_OBJS): ALL_CFLAGS += $(PROTO_INC)

$(PROTO_LIB): $(PROTO_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^
