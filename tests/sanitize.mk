# tests/sanitize.mk: the check programs (and the daemon they start) under sanitizers.
#
#   make check-asan   AddressSanitizer + UndefinedBehaviorSanitizer build in build/asan (CUDA=0)
#                     of liteattnd and every tests/check_* program except the GPU ones (check_gpu_*); runs them
#                     with halt_on_error=1. Every sanitizer report (of a test program or of a
#                     daemon a test started: tests/testutil_daemon.c runs $BUILD/liteattnd) is
#                     also written under build/asan/reports/, and the target fails when that
#                     folder is not empty after the run, so a report in a daemon that a test
#                     killed, or whose exit status no test looked at, still fails the target.
#   make check-tsan   ThreadSanitizer build in build/tsan of the programs that exercise the
#                     loop/worker hand-off (check_engine: engine with the cpu backend's workers
#                     in-process; check_client, check_daemon, check_load and check_faults:
#                     clients against a tsan daemon, including shutdown under load and clients
#                     killed mid-call; check_fair and check_keys: the fair queue, slices and
#                     cancellation; check_fastpath: the doorbell's slots and deferred errors).
#                     Suppressions, with reasons: tests/tsan.supp.
#
# gcc is used (its sanitizer runtimes are shared libraries, so libliteattn.so links with
# -Wl,--no-undefined); the flags ride on CC because the link rules do not use CFLAGS.
SAN_CC ?= gcc
SAN_COMMON := -fno-omit-frame-pointer -g -O1
ASAN_BUILD := build/asan
TSAN_BUILD := build/tsan
SAN_PROGS = $(patsubst tests/%.c,$(1)/tests/%,$(filter-out tests/check_gpu_%,$(TEST_SRCS)))
TSAN_PROGS = $(addprefix $(TSAN_BUILD)/tests/,check_engine check_client check_daemon check_load check_faults check_fair check_keys check_fastpath)

ASAN_OPTS := halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1
UBSAN_OPTS := halt_on_error=1:print_stacktrace=1
TSAN_OPTS := halt_on_error=1:second_deadlock_stack=1:history_size=4

# kernels/ref.c picks its micro-kernels through ifunc resolvers (target_clones), which the
# dynamic loader runs before the TSan runtime is initialised: instrumented, they crash at
# start. The CPU reference is not what check-tsan is about (the loop/worker hand-off is), so
# its objects are built without TSan instrumentation in the tsan tree; their threads are still
# seen by the runtime's interceptors (pthread_create/join, mutexes).
ifeq ($(BUILD),$(TSAN_BUILD))
$(BUILD)/obj/kernels/%.o: ALL_CFLAGS += -fno-sanitize=thread
endif

.PHONY: check-asan check-tsan
check-asan:
	$(Q)$(MAKE) --no-print-directory BUILD=$(ASAN_BUILD) CUDA=0 \
		CC="$(SAN_CC) -fsanitize=address,undefined -fno-sanitize-recover=undefined $(SAN_COMMON)" \
		CFLAGS="" $(ASAN_BUILD)/liteattnd $(ASAN_BUILD)/libliteattn.so.$(LA_VERSION) \
		$(ASAN_BUILD)/liteattnctl $(call SAN_PROGS,$(ASAN_BUILD))
	$(Q)rm -rf $(ASAN_BUILD)/reports && mkdir -p $(ASAN_BUILD)/reports
	$(Q)r=$$(pwd)/$(ASAN_BUILD)/reports; \
	BUILD=$(ASAN_BUILD) LA_TEST_NO_GPU=1 LA_PYTEST_DIRS= LA_TEST_SANITIZER=asan \
	ASAN_OPTIONS="$(ASAN_OPTS):log_path=$$r/asan" UBSAN_OPTIONS="$(UBSAN_OPTS):log_path=$$r/ubsan" \
	LSAN_OPTIONS="suppressions=$$(pwd)/tests/lsan.supp:print_suppressions=0" \
		tests/run.sh $(call SAN_PROGS,$(ASAN_BUILD)); rc=$$?; \
	if [ -n "$$(ls -A $$r)" ]; then \
		for f in $$r/*; do echo "==== sanitizer report $$f"; cat "$$f"; done; \
		echo "check-asan: sanitizer reports found (above)"; exit 1; fi; \
	exit $$rc

check-tsan:
	$(Q)$(MAKE) --no-print-directory BUILD=$(TSAN_BUILD) CUDA=0 \
		CC="$(SAN_CC) -fsanitize=thread $(SAN_COMMON)" \
		CFLAGS="" $(TSAN_BUILD)/liteattnd $(TSAN_BUILD)/libliteattn.so.$(LA_VERSION) \
		$(TSAN_BUILD)/liteattnctl $(filter $(TSAN_PROGS),$(call SAN_PROGS,$(TSAN_BUILD)))
	$(Q)rm -rf $(TSAN_BUILD)/reports && mkdir -p $(TSAN_BUILD)/reports
	$(Q)r=$$(pwd)/$(TSAN_BUILD)/reports; \
	BUILD=$(TSAN_BUILD) LA_TEST_NO_GPU=1 LA_PYTEST_DIRS= LA_TEST_SANITIZER=tsan \
	TSAN_OPTIONS="$(TSAN_OPTS):log_path=$$r/tsan:suppressions=$$(pwd)/tests/tsan.supp" \
		tests/run.sh $(filter $(TSAN_PROGS),$(call SAN_PROGS,$(TSAN_BUILD))); rc=$$?; \
	if [ -n "$$(ls -A $$r)" ]; then \
		for f in $$r/*; do echo "==== sanitizer report $$f"; cat "$$f"; done; \
		echo "check-tsan: sanitizer reports found (above)"; exit 1; fi; \
	exit $$rc
