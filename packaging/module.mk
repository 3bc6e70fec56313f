# packaging/: make install, make uninstall, make deb.
#
#   make install   [PREFIX=/usr/local] [DESTDIR=] installs the daemon, the tools, the library
#                  (soname links), the header, liteattn.pc, the systemd units, the sysusers.d
#                  entry, the sample configuration, the man pages (gzipped) and the docs.
#                  An existing $(SYSCONFDIR)/liteattn/liteattnd.conf is kept; the new sample
#                  goes next to it as liteattnd.conf.dist. The library goes to LIBDIR, the
#                  multiarch directory as in the .deb (lib/x86_64-linux-gnu); programs and
#                  library are stripped unless INSTALL_STRIP=0; without DESTDIR, ldconfig runs.
#   make uninstall [PREFIX=...] [DESTDIR=] removes them again (the configuration stays).
#   make deb       builds $(BUILD)/liteattn_<version>_<arch>.deb: `make install` into a staging
#                  tree with PREFIX=/usr and the multiarch LIBDIR, then dpkg-deb --root-owner-group.
#                  Needs dpkg-deb (package dpkg, always present), strip (binutils) and gzip;
#                  with dpkg-dev installed, Depends comes from dpkg-shlibdeps, otherwise from
#                  DEB_FALLBACK_DEPENDS below.
#
# Variables (beside PREFIX, DESTDIR, BINDIR, SBINDIR, LIBDIR, INCLUDEDIR, DATADIR, SYSCONFDIR of
# the top Makefile): SYSTEMDUNITDIR, SYSUSERSDIR, MANDIR, DOCDIR, PKGCONFIGDIR; for the
# package DEB_VERSION, DEB_MAINTAINER, DEB_STRIP=0 (keep debug symbols); INSTALL_STRIP, STRIP.

# systemd looks for units in /lib/systemd/system (the place of packaged units on Debian 12) and
# /usr/local/lib/systemd/system, and for sysusers.d entries in /usr/lib and /usr/local/lib.
SYSTEMDUNITDIR ?= $(if $(filter /usr,$(PREFIX)),/lib/systemd/system,$(PREFIX)/lib/systemd/system)
SYSUSERSDIR ?= $(if $(filter /usr,$(PREFIX)),/usr/lib/sysusers.d,$(PREFIX)/lib/sysusers.d)
MANDIR ?= $(DATADIR)/man
DOCDIR ?= $(DATADIR)/doc/liteattn
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
INSTALL ?= install
STRIP ?= strip
INSTALL_STRIP ?= 1

PKG_SO := libliteattn.so.$(LA_VERSION)
PKG_MANPAGES := docs/liteattnd.8 docs/liteattnctl.1
PKG_DOCS := $(wildcard README.md docs/OPERATIONS.md docs/SECURITY.md docs/SKIP-SEMANTICS.md \
	docs/ALLOCATORS.md)
# liteattn-mps.service (NVIDIA MPS for liteattnd) is installed but wanted by nothing until the
# drop-in example (docs/examples) is put in place.
PKG_UNITS := packaging/liteattnd.service packaging/liteattnd.socket packaging/liteattn-mps.service
PKG_EXAMPLES := packaging/liteattnd-mps.conf

# The installed units, man pages and docs name the installed paths.
PKG_SUBST := sed -e 's|/usr/sbin/liteattnd|$(SBINDIR)/liteattnd|g' \
	-e 's|/usr/bin/liteattnctl|$(BINDIR)/liteattnctl|g' \
	-e 's|/usr/share/doc/liteattn|$(DOCDIR)|g' \
	-e 's|/etc/liteattn|$(SYSCONFDIR)/liteattn|g'

# liteattn.pc: from libclient/liteattn.pc.in when it exists (@prefix@/@PREFIX@-style
# placeholders), else written here from the same variables. libdir and includedir are written
# relative to ${prefix} where they lie under PREFIX, so that `pkg-config --define-prefix` and
# a tree staged with DESTDIR and moved elsewhere still find the library and the header.
PKG_PC_IN := $(wildcard libclient/liteattn.pc.in)
PKG_PC := $(BUILD)/packaging/liteattn.pc
pc_rel = $(if $(filter $(PREFIX)/%,$(1)),$${$(2)}/$(patsubst $(PREFIX)/%,%,$(1)),$(1))
PKG_PC_LIBDIR := $(call pc_rel,$(LIBDIR),exec_prefix)
PKG_PC_INCLUDEDIR := $(call pc_rel,$(INCLUDEDIR),prefix)

$(PKG_PC): $(PKG_PC_IN) packaging/module.mk
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  GEN     $@")
ifneq ($(PKG_PC_IN),)
	$(Q)sed -e 's|@prefix@|$(PREFIX)|g; s|@PREFIX@|$(PREFIX)|g' \
		-e 's|@exec_prefix@|$${prefix}|g; s|@EXEC_PREFIX@|$${prefix}|g' \
		-e 's|@libdir@|$(PKG_PC_LIBDIR)|g; s|@LIBDIR@|$(PKG_PC_LIBDIR)|g' \
		-e 's|@includedir@|$(PKG_PC_INCLUDEDIR)|g; s|@INCLUDEDIR@|$(PKG_PC_INCLUDEDIR)|g' \
		-e 's|@version@|$(LA_VERSION)|g; s|@VERSION@|$(LA_VERSION)|g' \
		-e 's|@LA_VERSION@|$(LA_VERSION)|g' $< > $@.tmp
	$(Q)if grep -n '@[A-Za-z_]*@' $@.tmp; then \
		echo "$<: placeholders left unsubstituted (above)" >&2; rm -f $@.tmp; exit 1; fi
	$(Q)mv $@.tmp $@
else
	$(Q)printf '%s\n' 'prefix=$(PREFIX)' 'exec_prefix=$${prefix}' 'libdir=$(PKG_PC_LIBDIR)' \
		'includedir=$(PKG_PC_INCLUDEDIR)' '' \
		'Name: liteattn' \
		'Description: Client library of liteattnd, the LiteAttention attention daemon' \
		'Version: $(LA_VERSION)' 'Libs: -L$${libdir} -lliteattn' 'Cflags: -I$${includedir}' > $@
endif

# The pc file records PREFIX and LIBDIR: regenerate it whenever they change.
.PHONY: $(PKG_PC)

.PHONY: install uninstall deb
install: all $(PKG_PC)
	@for f in $(BUILD)/liteattnd $(BUILD)/liteattnctl $(BUILD)/$(PKG_SO); do \
		[ -f "$$f" ] || { echo "install: $$f was not built" >&2; exit 1; }; done
	$(Q)$(INSTALL) -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR) \
		$(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(SYSTEMDUNITDIR) \
		$(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(SYSCONFDIR)/liteattn $(DESTDIR)$(MANDIR)/man1 \
		$(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(DOCDIR)
	$(Q)$(INSTALL) -m 0755 $(BUILD)/liteattnd $(DESTDIR)$(SBINDIR)/liteattnd
	$(Q)$(INSTALL) -m 0755 $(BUILD)/liteattnctl $(DESTDIR)$(BINDIR)/liteattnctl
	$(Q)if [ -f $(BUILD)/liteattn-demo ]; then \
		$(INSTALL) -m 0755 $(BUILD)/liteattn-demo $(DESTDIR)$(BINDIR)/liteattn-demo; fi
	$(Q)$(INSTALL) -m 0644 $(BUILD)/$(PKG_SO) $(DESTDIR)$(LIBDIR)/$(PKG_SO)
ifeq ($(INSTALL_STRIP),1)
	$(Q)$(STRIP) --remove-section=.comment --remove-section=.note \
		$(DESTDIR)$(SBINDIR)/liteattnd $(DESTDIR)$(BINDIR)/liteattnctl \
		$$(ls $(DESTDIR)$(BINDIR)/liteattn-demo 2>/dev/null) && \
		$(STRIP) --strip-unneeded --remove-section=.comment --remove-section=.note \
		$(DESTDIR)$(LIBDIR)/$(PKG_SO)
endif
	$(Q)ln -sf $(PKG_SO) $(DESTDIR)$(LIBDIR)/libliteattn.so.$(LA_SOVERSION)
	$(Q)ln -sf libliteattn.so.$(LA_SOVERSION) $(DESTDIR)$(LIBDIR)/libliteattn.so
	$(Q)$(INSTALL) -m 0644 libclient/include/liteattn.h $(DESTDIR)$(INCLUDEDIR)/liteattn.h
	$(Q)$(INSTALL) -m 0644 include/liteattn_codes.h $(DESTDIR)$(INCLUDEDIR)/liteattn_codes.h
	$(Q)$(INSTALL) -m 0644 $(PKG_PC) $(DESTDIR)$(PKGCONFIGDIR)/liteattn.pc
	$(Q)for u in $(PKG_UNITS); do \
		$(PKG_SUBST) $$u > $(DESTDIR)$(SYSTEMDUNITDIR)/$$(basename $$u) && \
		chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/$$(basename $$u) || exit 1; done
	$(Q)$(INSTALL) -m 0644 packaging/liteattn.sysusers $(DESTDIR)$(SYSUSERSDIR)/liteattn.conf
	$(Q)conf=$(DESTDIR)$(SYSCONFDIR)/liteattn/liteattnd.conf; \
	if [ -e "$$conf" ]; then \
		$(INSTALL) -m 0644 packaging/liteattnd.conf "$$conf.dist"; \
		echo "install: kept the existing $$conf; the new sample is $$conf.dist"; \
	else $(INSTALL) -m 0644 packaging/liteattnd.conf "$$conf"; fi
	$(Q)for m in $(PKG_MANPAGES); do \
		s=$$(echo $$m | sed 's/.*\.//'); \
		$(PKG_SUBST) $$m | gzip -9n > $(DESTDIR)$(MANDIR)/man$$s/$$(basename $$m).gz && \
		chmod 0644 $(DESTDIR)$(MANDIR)/man$$s/$$(basename $$m).gz || exit 1; done
	$(Q)for d in $(PKG_DOCS); do \
		$(PKG_SUBST) $$d > $(DESTDIR)$(DOCDIR)/$$(basename $$d) && \
		chmod 0644 $(DESTDIR)$(DOCDIR)/$$(basename $$d) || exit 1; done
	$(Q)$(INSTALL) -d $(DESTDIR)$(DOCDIR)/examples
	$(Q)for d in $(PKG_EXAMPLES); do \
		$(PKG_SUBST) $$d > $(DESTDIR)$(DOCDIR)/examples/$$(basename $$d) && \
		chmod 0644 $(DESTDIR)$(DOCDIR)/examples/$$(basename $$d) || exit 1; done
	$(Q)$(if $(DESTDIR),true,ldconfig 2>/dev/null || true)
	@echo "installed under $(DESTDIR)$(PREFIX) (library in $(DESTDIR)$(LIBDIR), units in $(DESTDIR)$(SYSTEMDUNITDIR))"
	@$(if $(DESTDIR),true,echo "next: systemd-sysusers; systemctl daemon-reload; systemctl enable --now liteattnd.socket")

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/liteattnd $(DESTDIR)$(BINDIR)/liteattnctl \
		$(DESTDIR)$(BINDIR)/liteattn-demo $(DESTDIR)$(LIBDIR)/$(PKG_SO) \
		$(DESTDIR)$(LIBDIR)/libliteattn.so.$(LA_SOVERSION) $(DESTDIR)$(LIBDIR)/libliteattn.so \
		$(DESTDIR)$(PKGCONFIGDIR)/liteattn.pc $(DESTDIR)$(INCLUDEDIR)/liteattn.h \
		$(DESTDIR)$(INCLUDEDIR)/liteattn_codes.h \
		$(DESTDIR)$(SYSTEMDUNITDIR)/liteattnd.service $(DESTDIR)$(SYSTEMDUNITDIR)/liteattnd.socket \
		$(DESTDIR)$(SYSTEMDUNITDIR)/liteattn-mps.service \
		$(DESTDIR)$(SYSUSERSDIR)/liteattn.conf \
		$(DESTDIR)$(MANDIR)/man8/liteattnd.8.gz $(DESTDIR)$(MANDIR)/man1/liteattnctl.1.gz \
		$(DESTDIR)$(SYSCONFDIR)/liteattn/liteattnd.conf.dist
	rm -rf $(DESTDIR)$(DOCDIR)
	@echo "kept $(DESTDIR)$(SYSCONFDIR)/liteattn/liteattnd.conf (remove it by hand if unwanted)"

# ---- Debian package -----------------------------------------------------------------------
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
# dpkg-architecture comes with dpkg-dev; Debian's gcc answers the same question.
DEB_MULTIARCH := $(or $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null),$(LA_MULTIARCH))
DEB_LIBDIR := /usr/lib$(if $(DEB_MULTIARCH),/$(DEB_MULTIARCH))
DEB_VERSION ?= $(LA_VERSION)
DEB_MAINTAINER ?= liteattn maintainers <maintainers@users.noreply.r-seed-930de7cc.example>
DEB_STRIP ?= 1
DEB_FILE := $(BUILD)/liteattn_$(DEB_VERSION)_$(DEB_ARCH).deb
DEB_DIR := $(BUILD)/deb
DEB_ROOT := $(DEB_DIR)/root
# Without dpkg-shlibdeps: the run-time libraries the binaries link (Debian 12 package names).
# A CUDA build links libcudart statically but libstdc++ dynamically.
comma := ,
DEB_FALLBACK_DEPENDS := libc6 (>= 2.34), libuv1 (>= 1.44), libprotobuf-c1 (>= 1.4.1), \
	libsystemd0$(if $(filter 1,$(HAVE_CUDA)),$(comma) libstdc++6 (>= 12)$(comma) libgcc-s1)

deb: all
	$(Q)rm -rf $(DEB_DIR) && mkdir -p $(DEB_ROOT)/DEBIAN
	$(Q)$(MAKE) --no-print-directory install DESTDIR=$(abspath $(DEB_ROOT)) PREFIX=/usr \
		INSTALL_STRIP=$(DEB_STRIP) \
		BINDIR=/usr/bin SBINDIR=/usr/sbin LIBDIR=$(DEB_LIBDIR) INCLUDEDIR=/usr/include \
		DATADIR=/usr/share SYSCONFDIR=/etc SYSTEMDUNITDIR=/lib/systemd/system \
		SYSUSERSDIR=/usr/lib/sysusers.d MANDIR=/usr/share/man DOCDIR=/usr/share/doc/liteattn \
		PKGCONFIGDIR=$(DEB_LIBDIR)/pkgconfig >/dev/null
	@$(if $(Q),echo "  DEB     $(DEB_FILE)")
	$(Q)cd $(DEB_ROOT) && for f in usr/sbin/liteattnd usr/bin/liteattnctl .$(DEB_LIBDIR)/$(PKG_SO); do \
		LC_ALL=C readelf -d $$f | grep -q 'BIND_NOW' && LC_ALL=C readelf -lW $$f | grep -q GNU_RELRO || \
		echo "deb: warning: $$f lacks RELRO or BIND_NOW (LDFLAGS=$(LDFLAGS))" >&2; done
	$(Q)d=$(DEB_ROOT)/usr/share/doc/liteattn; \
		sed -e 's|@VERSION@|$(DEB_VERSION)|g' -e 's|@MAINTAINER@|$(DEB_MAINTAINER)|g' \
		-e "s|@DATE@|$$(date -R -u -d @$${SOURCE_DATE_EPOCH:-$$(git log -1 --format=%ct 2>/dev/null || date +%s)})|g" \
		packaging/debian/changelog | gzip -9n > $$d/changelog.gz && \
		$(INSTALL) -m 0644 packaging/debian/copyright $$d/copyright && \
		$(INSTALL) -d $(DEB_ROOT)/usr/share/lintian/overrides && \
		$(INSTALL) -m 0644 packaging/debian/lintian-overrides \
			$(DEB_ROOT)/usr/share/lintian/overrides/liteattn
	$(Q)cd $(DEB_ROOT) && for s in postinst prerm postrm; do \
		install -m 0755 $(CURDIR)/packaging/debian/$$s DEBIAN/$$s || exit 1; done && \
		install -m 0644 $(CURDIR)/packaging/debian/conffiles DEBIAN/conffiles && \
		install -m 0644 $(CURDIR)/packaging/debian/triggers DEBIAN/triggers && \
		echo "libliteattn $(LA_SOVERSION) liteattn (>= $(DEB_VERSION))" > DEBIAN/shlibs
	$(Q)deps=""; \
	if command -v dpkg-shlibdeps >/dev/null 2>&1; then \
		mkdir -p $(DEB_DIR)/src/debian && touch $(DEB_DIR)/src/debian/control && \
		root=$(abspath $(DEB_ROOT)) && \
		deps=$$(cd $(DEB_DIR)/src && dpkg-shlibdeps -O -S$$root \
			-l$$root$(DEB_LIBDIR) -xliteattn \
			$$root/usr/sbin/liteattnd $$root/usr/bin/liteattnctl \
			$$(ls $$root/usr/bin/liteattn-demo 2>/dev/null) $$root$(DEB_LIBDIR)/$(PKG_SO) \
			2>$(abspath $(DEB_DIR))/shlibdeps.log | sed -n 's/^shlibs:Depends=//p'); \
		[ -n "$$deps" ] || { cat $(DEB_DIR)/shlibdeps.log >&2; \
			echo "deb: dpkg-shlibdeps failed; using the fixed list" >&2; }; \
	fi; \
	[ -n "$$deps" ] || deps="$(DEB_FALLBACK_DEPENDS)"; \
	size=$$(du -sk --exclude=DEBIAN $(DEB_ROOT) | cut -f1); \
	sed -e 's|@VERSION@|$(DEB_VERSION)|' -e 's|@ARCH@|$(DEB_ARCH)|' \
		-e "s|@DEPENDS@|$$deps|" -e "s|@SIZE@|$$size|" \
		-e 's|@MAINTAINER@|$(DEB_MAINTAINER)|' \
		packaging/debian/control > $(DEB_ROOT)/DEBIAN/control
	$(Q)cd $(DEB_ROOT) && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | \
		LC_ALL=C sort -z | xargs -0 md5sum > DEBIAN/md5sums && chmod 0644 DEBIAN/md5sums
	$(Q)dpkg-deb --root-owner-group -Zxz --build $(DEB_ROOT) $(DEB_FILE) >/dev/null
	@echo "built $(DEB_FILE)"
	@dpkg-deb --field $(DEB_FILE) Package Version Architecture Depends
