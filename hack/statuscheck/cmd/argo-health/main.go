// Command argo-health evaluates an Argo CD Lua health check on one Kubernetes object the way Argo CD does.
//
//	argo-health [--open-libs] --lua health.lua OBJECT.json   ->   {"status":"Healthy","message":"..."}
//
// It follows argo-cd's util/lua/lua.go (VM.runLua and VM.ExecuteHealthLua): the object, decoded as an
// unstructured.Unstructured (integers are int64, as the controller's cache holds them), becomes the global Lua
// table `obj` through the same decodeValue; the script runs in gopher-lua with only the package, base and table
// libraries open (a script installed through argocd-cm runs so unless resource.customizations.useOpenLibs is
// set; --open-libs opens all of them, as for Argo CD's built-in scripts and its own health tests) and a one
// second deadline; the returned table is encoded by gopher-json and read as {status, message}; a status Argo
// CD does not know becomes Unknown, "Lua returned an invalid health status". Argo CD also opens a safe `os`
// library (time functions only); it is left out here, so a script that uses `os` fails instead of passing.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	luajson "layeh.com/gopher-json"
)

type healthStatus struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

var validStatus = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true,
}

func main() {
	script := flag.String("lua", "", "the health.lua script")
	openLibs := flag.Bool("open-libs", false, "open every Lua standard library (Argo CD's built-in scripts)")
	flag.Parse()
	if *script == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: argo-health [--open-libs] --lua health.lua OBJECT.json")
		os.Exit(2)
	}
	code, err := os.ReadFile(*script)
	check(err)
	raw, err := os.ReadFile(flag.Arg(0))
	check(err)
	obj := &unstructured.Unstructured{}
	check(obj.UnmarshalJSON(raw))
	result, err := executeHealthLua(obj, string(code), *openLibs)
	check(err)
	out, err := json.Marshal(result)
	check(err)
	fmt.Println(string(out))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "argo-health:", err)
		os.Exit(1)
	}
}

func executeHealthLua(obj *unstructured.Unstructured, script string, openLibs bool) (*healthStatus, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	defer l.Close()
	for _, pair := range []struct {
		n string
		f lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(pair.f), NRet: 0, Protect: true}, lua.LString(pair.n)); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 1*time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", decodeValue(l, obj.Object))
	if err := l.DoString(script); err != nil {
		return nil, err
	}
	returnValue := l.Get(-1)
	if returnValue.Type() != lua.LTTable {
		return nil, fmt.Errorf("expect table output from Lua script, not %s", returnValue.Type().String())
	}
	jsonBytes, err := luajson.Encode(returnValue)
	if err != nil {
		return nil, err
	}
	hs := &healthStatus{}
	if err := json.Unmarshal(jsonBytes, hs); err != nil {
		return nil, err
	}
	if !validStatus[hs.Status] {
		return &healthStatus{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return hs, nil
}

// decodeValue is argo-cd's util/lua decodeValue: Go values of an unstructured object as Lua values.
func decodeValue(L *lua.LState, value interface{}) lua.LValue {
	switch converted := value.(type) {
	case bool:
		return lua.LBool(converted)
	case float64:
		return lua.LNumber(converted)
	case string:
		return lua.LString(converted)
	case json.Number:
		return lua.LString(converted)
	case int:
		return lua.LNumber(converted)
	case int32:
		return lua.LNumber(converted)
	case int64:
		return lua.LNumber(converted)
	case []interface{}:
		arr := L.CreateTable(len(converted), 0)
		for _, item := range converted {
			arr.Append(decodeValue(L, item))
		}
		return arr
	case map[string]interface{}:
		tbl := L.CreateTable(0, len(converted))
		for key, item := range converted {
			tbl.RawSetH(lua.LString(key), decodeValue(L, item))
		}
		return tbl
	case nil:
		return lua.LNil
	}
	return lua.LNil
}
