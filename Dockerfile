# One image for the Dask scheduler, the Dask workers and the simcal driver (same Python, same
# dask/distributed everywhere). Builds from any Debian-based image that has python3 (>= 3.11)
# and python3-venv; nothing is installed with apt.
#
#   podman build --network=host -t simcal .
#   podman build --network=host --build-arg BASE_IMAGE=<debian + python3-venv> -t simcal .
#
# No ENTRYPOINT: the Helm chart passes the whole command in `args`
# (`dask scheduler`, `dask worker`, `simcal run`).
ARG BASE_IMAGE=python:3.12-slim

# The dependencies, pinned by constraints.txt (the versions the tests use), in /opt/venv, and
# the wheel build tools in /opt/build. The only stage that downloads anything: it and the image
# layer copied from it change only with pyproject.toml or constraints.txt.
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret (a secret mount is not
# stored in any layer): --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
FROM ${BASE_IMAGE} AS deps
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /opt/venv \
 && python3 -m venv /opt/build \
 && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -r requirements.txt \
 && /opt/build/bin/pip install --no-cache-dir setuptools==84.2.1 wheel==0.48.0

# The simcal wheel, built offline.
FROM deps AS wheel
COPY README.md ./
COPY src ./src
RUN /opt/build/bin/pip wheel --no-cache-dir --no-index --no-deps --no-build-isolation -w /wheels .

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="simcal" \
      org.opencontainers.image.description="simcal: Dask scheduler, workers and driver" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="simcal"
# uid/gid 1000 (the chart's runAsUser/fsGroup); reuse them if the base already has them.
RUN (getent group 1000 >/dev/null || groupadd --gid 1000 simcal) \
 && (getent passwd 1000 >/dev/null || useradd --no-log-init --uid 1000 --gid 1000 \
     --no-create-home --home-dir /home/simcal --shell /usr/sbin/nologin simcal) \
 && mkdir -p /home/simcal /data \
 && chown 1000:1000 /home/simcal /data
COPY --from=deps /opt/venv /opt/venv
# (Not RUN --mount=from=wheel: buildah 1.28 cannot mount a stage that was fully cached.)
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /tmp/wheels/simcal-*.whl \
 && rm -r /tmp/wheels \
 && /opt/venv/bin/pip check
ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/simcal \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /home/simcal
# Dask scheduler comm and dashboard, worker dashboard, driver metrics.
EXPOSE 8786 8787 8788 8000
CMD ["simcal", "--help"]
