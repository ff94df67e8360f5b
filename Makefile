PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-kafka kafka-jars registry test-registry test-pachd testpachd demo bench soak venv clean

venv: $(STAMP)

REQUIREMENTS := requirements.txt requirements-parquet.txt requirements-decode.txt requirements-dev.txt

$(STAMP): $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt \
		-r requirements-parquet.txt -r requirements-decode.txt -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Apache Kafka's own jars, pinned in tests/kafka/pom.xml, fetched once by Maven (Java 17+).
KAFKA_LIB := .cache/kafka-lib
KAFKA_STAMP := $(KAFKA_LIB)/.fetched

kafka-jars: $(KAFKA_STAMP)

$(KAFKA_STAMP): tests/kafka/pom.xml
	rm -rf $(KAFKA_LIB)
	mvn -q -B -Dstyle.color=never -f tests/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(KAFKA_LIB)
	touch $(KAFKA_STAMP)

# The broker-facing tests against Apache Kafka (a KRaft node per session), plus the tests
# only it can run (marked kafka_reference).
test-kafka: $(STAMP) $(KAFKA_STAMP)
	SPOUT_TEST_BROKER=kafka $(PY) -m pytest $(PYTEST_ARGS)

# A real Schema Registry (Apicurio Registry 2.4.2, Confluent-compatible API), assembled once by
# Maven from Central into .cache/registry (Java 17+); tests/registry/pom.xml says how.
REGISTRY_DIR := .cache/registry
REGISTRY_JAR := $(REGISTRY_DIR)/apicurio-test-registry-1-runner.jar

registry: $(REGISTRY_JAR)

$(REGISTRY_JAR): tests/registry/pom.xml tests/registry/settings.xml
	rm -rf $(REGISTRY_DIR)
	mvn -q -B -Dstyle.color=never -s tests/registry/settings.xml -f tests/registry/pom.xml \
		-Dregistry.build.directory=$(CURDIR)/$(REGISTRY_DIR) package
	test -f $(REGISTRY_JAR)

# DECODE=value|key,value against that registry: values made by confluent-kafka's serializers.
test-registry: $(STAMP) $(REGISTRY_JAR)
	SPOUT_TEST_REGISTRY=$(CURDIR)/$(REGISTRY_JAR) $(PY) -m pytest -m registry $(PYTEST_ARGS)

# Real pachd: Pachyderm's own testpachd at v2.12.2 (the version pachyderm-sdk pins), built by
# Go from the wrapper module in tests/pachd (its dex replace and seeded go.sum) into .cache/.
# The first build downloads about 1.4 GB of modules; a rebuild takes seconds.
TESTPACHD := .cache/testpachd

testpachd: $(TESTPACHD)

$(TESTPACHD): tests/pachd/go.mod tests/pachd/go.sum
	cd tests/pachd && go build -o $(CURDIR)/$(TESTPACHD) \
		github.com/pachyderm/pachyderm/v2/src/testing/testpachd

# The tests that use the `pachd` fixture (2.x delivery, chaos, metrics, plain repo, auth,
# concurrency) against real pachd; tests/real_pachd.py starts Postgres 15 (installed from
# Debian if absent), a pgbouncer relay, moto's S3 and testpachd, and stops them all.
test-pachd: $(STAMP) $(TESTPACHD)
	SPOUT_TEST_PACHD=real $(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) demo/demo.py

bench: $(STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)

soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-out .cache
