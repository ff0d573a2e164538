# ml-serving container: build the venv in one stage, copy only runtime files into a slim final one.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock ./
# requirements.lock holds runtime dependencies only, hash-locked; dev tools never enter the image.
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
# The embedded feature store (definitions, feature_store.yaml, the sqlite online store unpacked):
# the default ML_SERVING_FEATURE_REPO. Production mounts a Redis feature_store.yaml over it
# (deploy/overlays/redis). Feast itself is not installed: the server reads its format directly.
COPY feature_repo/feature_store.yaml feature_repo/tips.py feature_repo/
COPY feature_repo/data/online_store.db.gz feature_repo/data/
RUN gunzip feature_repo/data/online_store.db.gz

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    ML_SERVING_HOST=0.0.0.0 \
    ML_SERVING_PORT=50051 \
    ML_SERVING_METRICS_PORT=9090 \
    ML_SERVING_MODEL_ROOT=/app/models \
    PYTHONPATH=/app
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --no-create-home app
COPY --from=build /opt/venv /opt/venv
COPY --chown=app:app models /app/models
COPY --from=build /src/feature_repo /app/feature_repo
# The package runs from its source (PYTHONPATH): no build step, so no build backend to install.
COPY ml_serving /app/ml_serving
WORKDIR /app
USER 10001
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "ml_serving"]
