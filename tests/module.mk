# tests/: one Check program per module (tests/check_<module>.c), each linked with everything
# it may need. tests/testutil*.c hold the shared helpers and fixtures (ARCHITECTURE.md, "Tests").
# GPU tests skip themselves when no device is present (see tests/testutil.h).
TEST_SRCS := $(wildcard tests/check_*.c)
TEST_UTIL_OBJS := $(call objs,$(wildcard tests/testutil*.c) tests/rawproto.c)
CHECK_BINS := $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRCS))
TEST_LIBS := $(CHECK_LIBS) $(UV_LIBS) $(PROTOBUF_C_LIBS) $(SYSTEMD_LIBS) $(CUDA_LIBS) -ldl $(LDLIBS_BASE)

$(BUILD)/obj/tests/%.o: ALL_CFLAGS += $(ALL_INC)

$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(TEST_UTIL_OBJS) $(CLIENT_OBJS) $(DAEMON_STACK)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $(filter %.o %.a,$^) $(TEST_LIBS)

# check_warm runs the real CPU backend with the CUDA backend's late host view too (its
# "late view" tcase): it wraps be_cpu_new.
$(BUILD)/tests/check_warm: TEST_LIBS += -Wl,--wrap=be_cpu_new

PYTEST_DIRS := $(wildcard libclient/python/tests)

check: all $(CHECK_BINS)
	$(Q)BUILD=$(BUILD) LA_PYTEST_DIRS="$(PYTEST_DIRS)" tests/run.sh $(CHECK_BINS)

# The Python tests alone, with the quality smoke run (bench/quality/module.mk): what a second
# interpreter (a torch venv: make check-python PYTHON=build/venv/bin/python) adds to make check.
check-python: all
	$(Q)BUILD=$(BUILD) LA_PYTEST_DIRS="$(PYTEST_DIRS)" tests/run.sh
.PHONY: check-python
