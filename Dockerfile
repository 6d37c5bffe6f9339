# Image for the controller and the workers (compose.yaml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts contracts
COPY controller controller
COPY participants participants
COPY bench bench
RUN pip install --no-cache-dir . && useradd --create-home streamsaga
USER streamsaga
ENTRYPOINT []
CMD ["streamsaga", "--help"]
