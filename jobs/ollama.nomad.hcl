# Ollama on the aimodel driver, serving models from the shared store.
#   nomad job run jobs/ollama.nomad.hcl
# The models live once per cluster in the Ollama store on the shared export
# (<HF_HOME>/ollama, beside hub/). aimodel-agent finds the `models` below through
# Nomad's job list and prewarms them (or: aimodel-agent prewarm ollama://llama3.2:3b).
# The driver refuses to start while one is incomplete (Nomad retries), mounts the
# store read-only at OLLAMA_MODELS with OLLAMA_NOPRUNE=1, and loads every model
# once the server answers, so the first request does not pay the load.
#
# Note: OLLAMA_MODELS is Ollama's *directory* variable (the driver sets it), not
# a list of models. Name the models with `models = [...]`.

variable "region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

job "ollama" {
  region      = var.region
  datacenters = var.datacenters
  type        = "service"

  group "ollama" {
    network {
      port "http" {
        static = 11434
      }
    }

    # Only nodes whose driver found the shared cache (and so the store beside it).
    constraint {
      attribute = "${attr.driver.aimodel.hf_cache.writable}"
      value     = "true"
    }

    # Prefer nodes where the agent reports the model warm (its manifest digest).
    affinity {
      attribute = "$${attr.driver.aimodel.warm.ollama/llama3.2:3b}"
      operator  = "regexp"
      value     = "^sha256:[0-9a-f]{64}$"
      weight    = 50
    }

    restart {
      attempts = 5
      interval = "30m"
      delay    = "30s"
      mode     = "delay"
    }

    service {
      name     = "ollama"
      port     = "http"
      provider = "consul"

      check {
        type     = "http"
        path     = "/api/version"
        interval = "10s"
        timeout  = "2s"

        check_restart {
          limit = 3
          grace = "2m"
        }
      }
    }

    task "ollama" {
      driver = "aimodel"

      config {
        engine = "ollama"
        port   = "http"
        models = ["llama3.2:3b", "codellama:7b"]
      }

      # Models stay loaded while the server runs (the driver's preload asks for
      # keep_alive -1); set OLLAMA_KEEP_ALIVE to let idle ones unload instead.
      env {
        OLLAMA_MAX_LOADED_MODELS = "2"
      }

      resources {
        cpu    = 2000
        memory = 16384

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
