# Troupe Studio on an NVIDIA GPU:
#   docker build -t troupe .
#   docker run --gpus all -p 7860:7860 -v troupe-data:/data troupe                       # the embedded demo model
#   docker run --gpus all -p 7860:7860 -v troupe-data:/data troupe python app.py --host 0.0.0.0 \
#       --model stable-diffusion-v1-5/stable-diffusion-v1-5 --vram "24 GB"               # a Hub model (cached in /data)
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    HF_HOME=/data/huggingface \
    TROUPE_LIBRARY=/data/library \
    TROUPE_OUTPUTS=/data/outputs

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CUDA torch first (its wheels bring cuDNN and the CUDA libraries), then the rest; override for another CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t troupe .
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --upgrade pip && pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"

WORKDIR /app
COPY requirements.txt requirements-gpu.txt ./
RUN pip install -r requirements.txt \
 && pip uninstall -y onnxruntime \
 && pip install -r requirements-gpu.txt

# The app (see .dockerignore: no virtual environment, tests or outputs from the build machine).
COPY . ./

RUN useradd --create-home troupe && mkdir -p /data && chown troupe /data
USER troupe
VOLUME /data
EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0"]
