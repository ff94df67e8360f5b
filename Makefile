PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-kafka kafka-jars registry test-registry demo bench soak venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
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

demo: $(STAMP)
	$(PY) demo/demo.py

bench: $(STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)

soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-out .cache
