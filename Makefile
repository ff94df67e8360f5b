PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help test test-kafka kafka-jars registry test-registry test-pachd testpachd demo try try-usage \
	bench soak venv clean
.DEFAULT_GOAL := help

help: ## this list
	@echo "make TARGET, where TARGET is one of:"
	@sed -n 's/^\([a-z-]*\):.*## \(.*\)/  \1\t\2/p' $(MAKEFILE_LIST) | expand -t 18

venv: $(STAMP) ## .venv with every pinned requirement (the other targets make it too)

REQUIREMENTS := requirements.txt requirements-parquet.txt requirements-decode.txt requirements-dev.txt

$(STAMP): $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt \
		-r requirements-parquet.txt -r requirements-decode.txt -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP) ## the default suite: Tansu broker, pachd double, no Java or Go (about 5 min)
	$(PY) -m pytest $(PYTEST_ARGS)

# Apache Kafka's own jars, pinned in tests/kafka/pom.xml, fetched once by Maven (Java 17+).
KAFKA_LIB := .cache/kafka-lib
KAFKA_STAMP := $(KAFKA_LIB)/.fetched

kafka-jars: $(KAFKA_STAMP) ## fetch Apache Kafka's jars for test-kafka (Java 17+, Maven)

$(KAFKA_STAMP): tests/kafka/pom.xml
	rm -rf $(KAFKA_LIB)
	mvn -q -B -Dstyle.color=never -f tests/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(KAFKA_LIB)
	touch $(KAFKA_STAMP)

# The broker-facing tests against Apache Kafka (a KRaft node per session), plus the tests
# only it can run (marked kafka_reference).
test-kafka: $(STAMP) $(KAFKA_STAMP) ## the broker-facing tests against Apache Kafka 4.1.2 (Java 17+, Maven)
	SPOUT_TEST_BROKER=kafka $(PY) -m pytest $(PYTEST_ARGS)

# A real Schema Registry (Apicurio Registry 2.4.2, Confluent-compatible API), assembled once by
# Maven from Central into .cache/registry (Java 17+); tests/registry/pom.xml says how.
REGISTRY_DIR := .cache/registry
REGISTRY_JAR := $(REGISTRY_DIR)/apicurio-test-registry-1-runner.jar

registry: $(REGISTRY_JAR) ## assemble Apicurio Registry for test-registry (Java 17+, Maven)

$(REGISTRY_JAR): tests/registry/pom.xml tests/registry/settings.xml
	rm -rf $(REGISTRY_DIR)
	mvn -q -B -Dstyle.color=never -s tests/registry/settings.xml -f tests/registry/pom.xml \
		-Dregistry.build.directory=$(CURDIR)/$(REGISTRY_DIR) package
	test -f $(REGISTRY_JAR)

# DECODE=value|key,value against that registry: values made by confluent-kafka's serializers.
test-registry: $(STAMP) $(REGISTRY_JAR) ## DECODE against a real Schema Registry (Java 17+, Maven)
	SPOUT_TEST_REGISTRY=$(CURDIR)/$(REGISTRY_JAR) $(PY) -m pytest -m registry $(PYTEST_ARGS)

# Real pachd: Pachyderm's own testpachd at v2.12.2 (the version pachyderm-sdk pins), built by
# Go from the wrapper module in tests/pachd (its dex replace and seeded go.sum) into .cache/.
# The first build downloads about 1.4 GB of modules; a rebuild takes seconds.
TESTPACHD := .cache/testpachd

testpachd: $(TESTPACHD) ## build Pachyderm's testpachd for test-pachd (Go 1.23+, 1.4 GB of modules)

$(TESTPACHD): tests/pachd/go.mod tests/pachd/go.sum
	cd tests/pachd && go build -o $(CURDIR)/$(TESTPACHD) \
		github.com/pachyderm/pachyderm/v2/src/testing/testpachd

# The tests that use the `pachd` fixture (2.x delivery, chaos, metrics, plain repo, auth,
# concurrency) against real pachd; tests/real_pachd.py starts Postgres 15 (installed from
# Debian if absent), a pgbouncer relay, moto's S3 and testpachd, and stops them all.
test-pachd: $(STAMP) $(TESTPACHD) ## the pachd tests against real pachd 2.12.2 (Go; Postgres, as root)
	SPOUT_TEST_PACHD=real $(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP) ## a local broker, 300 messages, the spout into 1.x, 2.x and Parquet
	$(PY) demo/demo.py

# Your own Kafka, no Pachyderm: the spout into the pachd double (or --delivery pipe), printing
# each commit. Other settings from the environment, e.g. FORMAT=jsonl make try ...
try: try-usage $(STAMP) ## BOOTSTRAP=host:port TOPIC=name [TRY_ARGS=...]: your Kafka, no Pachyderm
	$(PY) demo/try.py --bootstrap "$(BOOTSTRAP)" --topic "$(TOPIC)" $(TRY_ARGS)

# Before the venv is built: a missing argument is said at once.
try-usage:
	@test -n "$(BOOTSTRAP)" && test -n "$(TOPIC)" || \
		{ echo "usage: make try BOOTSTRAP=host:port TOPIC=name [TRY_ARGS='--messages 100 --delivery pipe']"; exit 2; }

bench: $(STAMP) ## the performance tables of docs/performance.md (about 5 min; BENCH_ARGS)
	$(PY) bench/bench.py $(BENCH_ARGS)

soak: $(STAMP) ## 10 minutes at 3,000 messages/s, RSS once a minute (SOAK_ARGS)
	$(PY) bench/soak.py $(SOAK_ARGS)

clean: ## remove .venv, caches and demo-out
	rm -rf $(VENV) .pytest_cache .hypothesis demo-out .cache
