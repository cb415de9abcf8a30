# The worker, for hosted Supabase projects (or any PostgreSQL with the migrations applied).
# Configuration comes only from the environment: SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY (or
# DATABASE_URL), REPLICATE_API_TOKEN, … (see the README's configuration table).
#
#   docker build -t assistant-worker .
#   docker run --env-file worker.env -p 9108:9108 assistant-worker           # the daemon
#   docker run --env-file worker.env assistant-worker doctor                 # check the deployment

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/*.whl

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9108 \
    SUPABASE_DIR=/app/supabase
RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin worker
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels supabase-assistant-worker \
 && rm -rf /wheels
# The migrations ship with the worker so that `doctor` can tell whether the database is current.
COPY supabase/migrations ./supabase/migrations
USER 10001:10001
EXPOSE 9108
HEALTHCHECK --interval=30s --timeout=5s \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9108/healthz', timeout=3)"]
# SIGTERM: stop claiming, finish work in flight within WORKER_SHUTDOWN_GRACE_SECONDS (default 30),
# then wait for creates held by Prefer: wait (unstreamed replies, and under load those written
# whole past the stream budget) to cancel their predictions: 195 s in all with the defaults. Give
# docker/k8s a stop timeout of 200 s (`docker run --stop-timeout 200`, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "worker"]
CMD ["run"]
