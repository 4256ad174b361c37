# SGLang behind its router: workers register in Consul, the router fronts them.

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
  default = "Qwen/Qwen2.5-7B-Instruct"
}

variable "workers" {
  type    = number
  default = 2
}

job "sglang" {
  region      = var.region
  datacenters = var.datacenters
  type        = "service"

  group "workers" {
    count = var.workers

    network {
      port "http" {}
    }

    volume "hf-cache" {
      type      = "host"
      source    = "hf-cache"
      read_only = true
    }

    restart {
      attempts = 5
      interval = "30m"
      delay    = "30s"
      mode     = "delay"
    }

    update {
      max_parallel     = 1
      healthy_deadline = "30m"
      progress_deadline = "40m"
    }

    service {
      name     = "sglang-worker"
      port     = "http"
      provider = "consul"

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

    task "worker" {
      driver = "aimodel"

      config {
        engine = "sglang"
        model  = var.model
        port   = "http"
        args   = ["--mem-fraction-static", "0.85"]
      }

      volume_mount {
        volume      = "hf-cache"
        destination = "/hf-cache"
        read_only   = true
      }

      resources {
        cpu    = 4000
        memory = 24576

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }

  group "router" {
    network {
      port "http" {
        static = 30000
      }
    }

    service {
      name     = "sglang"
      port     = "http"
      provider = "consul"

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "router" {
      driver = "aimodel"

      # The worker list comes from Consul; the router is re-rendered when it changes.
      template {
        destination = "local/workers.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
        WORKER_URLS={{ range $i, $s := service "sglang-worker" }}{{ if $i }} {{ end }}http://{{ $s.Address }}:{{ $s.Port }}{{ end }}
        EOT
      }

      config {
        engine = "sglang-router"
        port   = "http"
        args   = ["--worker-urls", "${WORKER_URLS}"]
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
