# fuzz/: libFuzzer targets (clang, -fsanitize=fuzzer,address,undefined) and their seed corpora.
#
#   make fuzz            builds build/fuzz/fuzz/fuzz_{frame,dispatch} (CUDA=0)
#   make fuzz-smoke      runs each target FUZZ_TIME seconds (default 30) from its seed corpus
#                        (fuzz/corpus/<target>; new inputs go to build/fuzz/corpus/<target>) and
#                        fails on any crash, leak, timeout or sanitizer report
#   make fuzz-corpus     regenerates the seed corpora with fuzz/make_corpus.c
#
# Targets: fuzz_frame (proto/frame.c: the frame reader over byte streams cut at arbitrary
# points, with fds) and fuzz_dispatch (Request decoding, validation and dispatch of every
# message type through conn.c/dispatch.c into an engine with the cpu backend). Each file's
# header says what it checks. Needs clang's libFuzzer runtime (Debian: libclang-rt-14-dev).
FUZZ_BUILD := build/fuzz
FUZZ_TARGETS := frame dispatch
FUZZ_CC ?= clang
FUZZ_TIME ?= 30
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1
FUZZ_ARGS ?= -timeout=20 -rss_limit_mb=2048 -print_final_stats=1

# Inside the sub-make (BUILD=build/fuzz, CC with the sanitizers).
$(BUILD)/obj/fuzz/%.o: ALL_CFLAGS += $(ALL_INC)
$(BUILD)/fuzz/fuzz_%: $(BUILD)/obj/fuzz/fuzz_%.o $(DAEMON_STACK)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -fsanitize=fuzzer -o $@ $(filter %.o %.a,$^) $(DAEMON_LIBS)

$(BUILD)/fuzz/make_corpus: $(BUILD)/obj/fuzz/make_corpus.o $(PROTO_LIB) $(COMMON_LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $^ $(PROTOBUF_C_LIBS) $(LDLIBS_BASE)

.PHONY: fuzz fuzz-smoke fuzz-corpus
fuzz:
	$(Q)$(MAKE) --no-print-directory BUILD=$(FUZZ_BUILD) CUDA=0 CFLAGS="" \
		CC="$(FUZZ_CC) -fsanitize=fuzzer-no-link $(FUZZ_SAN)" \
		$(addprefix $(FUZZ_BUILD)/fuzz/fuzz_,$(FUZZ_TARGETS))

fuzz-smoke: fuzz
	$(Q)for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
		echo "== fuzz_$$t: $(FUZZ_TIME) s"; \
		log=$(FUZZ_BUILD)/fuzz_$$t.log; \
		ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(FUZZ_BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_TIME) $(FUZZ_ARGS) \
			-artifact_prefix=$(FUZZ_BUILD)/crash-$$t- \
			$(FUZZ_BUILD)/corpus/$$t fuzz/corpus/$$t >$$log 2>&1; rc=$$?; \
		grep -E '^(#[0-9]+.*(INITED|DONE)|stat::|Done )' $$log; \
		if [ $$rc -ne 0 ]; then tail -n 60 $$log; echo "fuzz_$$t failed (exit $$rc; log $$log)"; exit 1; fi; \
	done

fuzz-corpus:
	$(Q)$(MAKE) --no-print-directory $(BUILD)/fuzz/make_corpus
	$(Q)rm -rf fuzz/corpus && $(BUILD)/fuzz/make_corpus fuzz/corpus
