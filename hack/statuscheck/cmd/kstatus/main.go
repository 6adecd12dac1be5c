// Command kstatus computes an object's kstatus the way Flux's health checks do.
//
//	kstatus OBJECT.json   ->   {"status":"Current","message":"..."}
//
// status.Compute of sigs.k8s.io/cli-utils/pkg/kstatus/status on the object as an unstructured.Unstructured:
// the same call Flux's kustomize-controller and helm-controller make (through cli-utils' status poller) for a
// `wait: true` or `healthChecks` Kustomization, for kinds with no built-in rule, such as RegistryMirror.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: kstatus OBJECT.json")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	check(err)
	obj := &unstructured.Unstructured{}
	check(obj.UnmarshalJSON(raw))
	result, err := status.Compute(obj)
	check(err)
	out, err := json.Marshal(map[string]string{"status": result.Status.String(), "message": result.Message})
	check(err)
	fmt.Println(string(out))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}
