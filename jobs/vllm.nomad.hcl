# One vLLM model server on the aimodel driver.
#   nomad job run -var model=mistralai/Mistral-7B-Instruct-v0.3 jobs/vllm.nomad.hcl
# The model must be warm in the shared HF cache (aimodel-agent prewarm), or the
# start fails with a recoverable error naming what is missing and Nomad retries.

variable "region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "model" {
  type    = string
  default = "mistralai/Mistral-7B-Instruct-v0.3"
}

variable "revision" {
  type    = string
  default = "main"
}

variable "gpus" {
  type    = number
  default = 1
}

job "vllm" {
  region      = var.region
  datacenters = var.datacenters
  type        = "service"

  group "llm" {
    count = 1

    network {
      port "http" {}
    }

    # Only nodes whose client declares the shared cache volume, and whose cache the
    # driver found writable (its other health checks — NFS, free space, a hung
    # mount — mark the whole driver unhealthy, which keeps tasks off by itself).
    volume "hf-cache" {
      type      = "host"
      source    = "hf-cache"
      read_only = true
    }

    constraint {
      attribute = "${attr.driver.aimodel.hf_cache.writable}"
      value     = "true"
    }

    # Prefer nodes where aimodel-agent reports the model warm (its commit).
    affinity {
      attribute = "$${attr.driver.aimodel.warm.${var.model}}"
      operator  = "regexp"
      value     = "^[0-9a-f]{40}$"
      weight    = 50
    }

    # Model loads take minutes: be patient before calling a start failed.
    restart {
      attempts = 5
      interval = "30m"
      delay    = "30s"
      mode     = "delay"
    }

    update {
      max_parallel      = 1
      min_healthy_time  = "30s"
      healthy_deadline  = "30m"
      progress_deadline = "40m"
      auto_revert       = true
    }

    service {
      name     = "vllm"
      port     = "http"
      provider = "consul"
      tags     = ["llm", "openai"]

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit = 3
          grace = "30m"
        }
      }
    }

    task "server" {
      driver = "aimodel"

      config {
        engine   = "vllm"
        model    = var.model
        revision = var.revision
        port     = "http"
        shm_size = "16g"
        args     = ["--max-model-len", "8192", "--gpu-memory-utilization", "0.92"]

        readiness {
          path     = "/health"
          interval = "5s"
          timeout  = "30m"
        }
      }

      volume_mount {
        volume      = "hf-cache"
        destination = "/hf-cache"
        read_only   = true
      }

      resources {
        cpu    = 4000
        memory = 32768

        device "nvidia/gpu" {
          count = var.gpus

          constraint {
            attribute = "${device.attr.memory}"
            operator  = ">="
            value     = "16 GiB"
          }
        }
      }

      kill_timeout = "60s"
    }
  }
}
