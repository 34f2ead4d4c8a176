// Command coredns is CoreDNS (pinned in go.mod) with only the plugins the local cluster's DNS needs:
// the kubernetes plugin answers cluster.local; nothing is forwarded outside the cluster's namespace.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

func init() {
	dnsserver.Directives = []string{
		"errors", "log", "health", "ready", "cache", "loadbalance", "kubernetes", "template",
	}
}

func main() { coremain.Run() }
