# kafka-spout: the container of a Pachyderm 1.x spout pipeline (see pipeline.json).
FROM python:3.11.10-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin spout
WORKDIR /app

# Dependencies before the code: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY spout.py .

USER 10001
CMD ["python", "/app/spout.py"]
