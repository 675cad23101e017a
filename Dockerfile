# naiad: one image for the scheduler, the peer daemon and the CLI.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY scheduler ./scheduler
COPY peer ./peer
COPY naiad ./naiad
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /
ENTRYPOINT ["naiad"]
CMD ["--help"]
