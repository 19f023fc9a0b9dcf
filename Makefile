# cvd — see README.md. `make demo` and `make test` set up everything they need.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
BIN := bin/cvd
PKGS := ./...

.PHONY: all build test test-short vet fmt deps guest demo bench fuzz clean loadtest

all: build

VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

build:
	CGO_ENABLED=0 $(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/cvd

deps:
	@scripts/deps.sh

# The tiny guest (kernel + busybox initramfs) for the libvirt tests, in .cache/guest.
guest: deps
	@if [ -x scripts/build-guest.sh ]; then scripts/build-guest.sh; fi

vet:
	$(GO) vet $(PKGS)
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

# Every test. QEMU (and libvirt, for the hypervisor tests) are required: a test that
# needs them fails instead of skipping.
test: deps guest build vet
	CVD_TEST_REQUIRE=all $(GO) test -count=1 -timeout 60m $(PKGS)
	# The store and the sync server again with their catalog on PostgreSQL (a
	# private cluster that the tests start as the postgres user).
	CVD_TEST_REQUIRE=all CVD_TEST_CATALOG=postgres $(GO) test -count=1 -timeout 30m ./images ./desktop ./syncd/...
	# The packages whose pipelines run on several goroutines, again under the
	# race detector.
	CVD_TEST_REQUIRE=all $(GO) test -race -count=1 -timeout 30m ./images ./syncd/...
	@$(MAKE) --no-print-directory fuzz FUZZTIME=10s

test-short: build
	$(GO) test -short $(PKGS)

# Short fuzzing runs of every parser (longer: make fuzz FUZZTIME=5m). An input
# that finds new coverage is minimized for at most FUZZMINTIME executions (go
# test's default, 60 s, outlasts a short run; even 2 s per new input leaves a
# 10 s run only a few hundred executions). A run that executes fewer than
# FUZZMINEXECS inputs fails: a fuzz target that does not really run is a defect. A run
# whose only failure is Go 1.26's coordinator race at the deadline ("context deadline
# exceeded", no failing input written: go.dev/issue/75804) passes when a replay of the
# target's corpus passes.
FUZZTIME ?= 30s
FUZZMINTIME ?= 50x
FUZZMINEXECS ?= 1000
FUZZPKGS = ./disk ./syncd/proto ./nbd ./files
fuzz:
	@for p in $(FUZZPKGS); do \
	  for t in $$($(GO) test -list '^Fuzz' $$p | grep '^Fuzz'); do \
	    echo "fuzz $$p $$t ($(FUZZTIME))"; \
	    out=$$($(GO) test -run '^$$' -fuzz "^$$t\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME) $$p 2>&1); rc=$$?; \
	    echo "$$out" | tail -3; \
	    if [ $$rc -ne 0 ] && echo "$$out" | grep -q '^    context deadline exceeded$$' && ! echo "$$out" | grep -q 'Failing input written'; then \
	      echo "fuzz $$p $$t: the fuzzing coordinator's shutdown race at the -fuzztime deadline (go.dev/issue/75804, fixed in Go 1.27), no failing input; replaying the corpus"; \
	      $(GO) test -count=1 -run "^$$t\$$" $$p || exit 1; rc=0; \
	    fi; \
	    if [ $$rc -ne 0 ]; then echo "$$out"; exit 1; fi; \
	    n=$$(echo "$$out" | sed -n 's/.*execs: \([0-9]*\).*/\1/p' | tail -1); \
	    if [ -z "$$n" ] || [ "$$n" -lt $(FUZZMINEXECS) ]; then echo "fuzz $$p $$t executed $${n:-no} inputs, fewer than $(FUZZMINEXECS)"; exit 1; fi; \
	  done; \
	done

demo: deps guest build
	scripts/demo.sh

bench: deps build
	scripts/bench.sh

clean:
	rm -rf bin .cache/demo .cache/bench

# The load test: three cvd serve on one PostgreSQL catalog and store behind
# haproxy, LOADTEST_LAPTOPS simulated laptops doing check-out → write 8 MiB →
# check-in rounds for LOADTEST, an administrator cloning and recomposing, one
# server SIGKILLed and restarted midway. See cmd/cvd/loadtest_test.go.
LOADTEST ?= 5m
LOADTEST_LAPTOPS ?= 50
loadtest: deps build
	CVD_TEST_REQUIRE=all CVD_LOADTEST=$(LOADTEST) CVD_LOADTEST_LAPTOPS=$(LOADTEST_LAPTOPS) \
	  $(GO) test -count=1 -run '^TestLoad$$' -v -timeout 60m ./cmd/cvd
