# common/: the bottom layer beside include/liteattn_codes.h: the error-code names (codes.c)
# and the intrusive list (list.h). Produces $(BUILD)/libcommon.a, linked by everything.
COMMON_SRCS := $(wildcard common/*.c)
COMMON_OBJS := $(call objs,$(COMMON_SRCS))
COMMON_LIB := $(BUILD)/libcommon.a

$(COMMON_LIB): $(COMMON_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && $(AR) rcs $@ $^
