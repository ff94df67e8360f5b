# kafka-spout: the image of a Pachyderm spout pipeline, 2.x (pipeline-v2.json: commits through
# pachd) and 1.x (pipeline.json, pipeline-marker.json: archives through /pfs/out) alike.
FROM python:3.11.10-slim-bookworm

# The optional libraries to install: "parquet" (pyarrow, for FORMAT=parquet, about 176 MB
# installed) and "decode" (confluent-kafka, fastavro, protobuf, grpcio-tools, for DECODE,
# about 69 MB). Both by default, so that every setting works; `--build-arg EXTRAS=` builds an
# image with about 67 MB of packages instead of 311 MB, which refuses those two settings at
# start (docs/image.md: how these were measured).
ARG EXTRAS="parquet decode"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin spout
WORKDIR /app

# Dependencies before the code: this layer is rebuilt only when the requirements change.
COPY requirements.txt requirements-parquet.txt requirements-decode.txt ./
RUN set -eu; set --; \
    for extra in $EXTRAS; do set -- "$@" -r "requirements-$extra.txt"; done; \
    pip install --no-cache-dir -r requirements.txt "$@"

COPY spout.py .

USER 10001
CMD ["python", "/app/spout.py"]
