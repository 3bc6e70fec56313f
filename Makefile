# liteattn — one non-recursive GNU Makefile. Each folder adds its own rules in module.mk
# (included below); every output goes under $(BUILD).
#
#   make              build everything (CPU pieces always; CUDA pieces when nvcc is found)
#   make check        build and run the tests (GPU tests skip themselves without a GPU)
#   make demo         start a daemon on a temporary socket and run a short generation through it
#   make install      PREFIX=/usr/local DESTDIR= install the daemon, tools, library and headers
#   make clean
#
# Variables: V=1 (show commands), CUDA=0 (build without CUDA even if nvcc exists),
# CUDA_ARCHS="80 86 89 90" (SASS targets; 90a is added for Hopper-only kernels),
# NVCC=path, PORTABLE=1 (link libuv/protobuf-c/check statically and cudart statically, so
# that the binaries run on a machine without those libraries installed).

BUILD ?= build
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
DATADIR ?= $(PREFIX)/share
SYSCONFDIR ?= /etc

CC ?= cc
CFLAGS ?= -O2 -g
PKG_CONFIG ?= pkg-config
PROTOC_C ?= protoc-c

LA_SOVERSION := 0
LA_VERSION := 0.1.0

ifeq ($(V),1)
Q :=
else
Q := @
endif

# ---- CUDA detection ------------------------------------------------------------------------
CUDA ?= 1
NVCC ?= $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
ifeq ($(CUDA),0)
NVCC :=
endif
HAVE_CUDA := $(if $(NVCC),1,0)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_ARCHS ?= 80 86 89 90
NVCC_GENCODE := $(foreach a,$(CUDA_ARCHS),-gencode=arch=compute_$(a),code=sm_$(a))
NVCCFLAGS ?= -O3 -std=c++17 -lineinfo --expt-relaxed-constexpr -Xcompiler -fPIC

# ---- common flags ---------------------------------------------------------------------------
WARN := -Wall -Wextra -Wshadow -Wno-unused-parameter -Wstrict-prototypes -Wmissing-prototypes
# Include paths follow the layer order (see ARCHITECTURE.md): every object sees include/ and
# common/, the bottom; each folder adds only the folders below it (the *_INC of its module.mk).
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE -pthread -fPIC $(WARN) $(CFLAGS) -MMD -MP \
	-Iinclude -Icommon
KERNEL_INC := -Ikernels
PROTO_INC := -Iproto -I$(BUILD)/proto
ENGINE_INC := -Iengine $(KERNEL_INC)
DAEMON_INC := -Idaemon $(ENGINE_INC) $(PROTO_INC)
CLIENT_INC := -Ilibclient/include -Ilibclient $(PROTO_INC)
# tests/, fuzz/ and bench/ drive every layer.
ALL_INC := $(DAEMON_INC) -Ilibclient/include
ifeq ($(HAVE_CUDA),1)
ALL_CFLAGS += -DLA_HAVE_CUDA=1 -I$(CUDA_HOME)/include
endif

ifeq ($(PORTABLE),1)
UV_LIBS := -l:libuv_a.a -ldl
PROTOBUF_C_LIBS := -l:libprotobuf-c.a
CHECK_LIBS := -l:libcheck.a -l:libsubunit.a -lm -lrt
else
UV_LIBS := $(shell $(PKG_CONFIG) --libs libuv 2>/dev/null || echo -luv)
PROTOBUF_C_LIBS := $(shell $(PKG_CONFIG) --libs libprotobuf-c 2>/dev/null || echo -lprotobuf-c)
CHECK_LIBS := $(shell $(PKG_CONFIG) --libs check 2>/dev/null || echo -lcheck -lsubunit -lm -lrt)
endif
SYSTEMD_LIBS := $(shell $(PKG_CONFIG) --libs libsystemd 2>/dev/null || echo -lsystemd)
ifeq ($(HAVE_CUDA),1)
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart_static -lstdc++ -ldl -lrt -lpthread
else
CUDA_LIBS :=
endif
LDLIBS_BASE := -pthread -lm

# ---- object helpers -------------------------------------------------------------------------
# $(call objs,SRCS) maps sources to objects under $(BUILD)/obj.
objs = $(patsubst %.c,$(BUILD)/obj/%.o,$(filter %.c,$(1))) \
       $(patsubst %.cu,$(BUILD)/obj/%.cu.o,$(filter %.cu,$(1)))

PROTO_GEN_H := $(BUILD)/proto/liteattn.pb-c.h

# Objects may include the generated protocol header, so they wait for it; kernels/ never do,
# and their more specific rule lets them build where protoc-c is absent (the GPU machine).
$(BUILD)/obj/%.o: %.c | $(PROTO_GEN_H)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(ALL_CFLAGS) -c $< -o $@

$(BUILD)/obj/kernels/%.o: kernels/%.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(ALL_CFLAGS) $(KERNEL_INC) -c $< -o $@

$(BUILD)/obj/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  NVCC    $<")
	$(Q)$(NVCC) $(NVCCFLAGS) $(NVCC_GENCODE) $(NVCC_EXTRA_$(notdir $<)) \
		-Iinclude $(KERNEL_INC) -MMD -MP -c $< -o $@

ALL_TARGETS :=
CHECK_BINS :=
CLEAN_EXTRA :=

.PHONY: all check demo install clean bench
# Keep intermediate objects (test objects would otherwise be deleted and rebuilt each time).
.SECONDARY:
all: all-targets

# ---- modules (bottom layer first) -----------------------------------------------------------
include common/module.mk
include proto/module.mk
include kernels/module.mk
include engine/module.mk
include daemon/module.mk
include libclient/module.mk
include tests/module.mk
-include bench/module.mk
-include bench/quality/module.mk
-include packaging/module.mk
-include tests/sanitize.mk
-include fuzz/module.mk

all-targets: $(ALL_TARGETS)
ifeq ($(HAVE_CUDA),0)
	@echo "note: nvcc not found (or CUDA=0): built the CPU pieces only; the CUDA kernels and backend were left out"
endif
.PHONY: all-targets

# The main job: a generation through a daemon on a temporary socket (GPU when present).
demo: all
	$(Q)BUILD=$(BUILD) libclient/tools/run-demo.sh

clean:
	rm -rf $(BUILD) $(CLEAN_EXTRA)

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
