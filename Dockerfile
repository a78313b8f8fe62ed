FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY lorafile ./lorafile
COPY lorastack ./lorastack
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir -e '.[worker]'
ENV LORASTACK_DATA_DIR=/data
EXPOSE 8000
CMD ["lorastack", "serve", "--no-worker", "--host", "0.0.0.0"]
