// What `ollama create` and a chat request do with a Modelfile, up to the prompt text, in Go's own text/template:
// parse the Modelfile with Ollama's grammar, check its FROM file and its parameters the way Ollama's create request
// does, then render a conversation through its TEMPLATE as Ollama's chat handler does (the Modelfile's SYSTEM added
// to a chat without a system message, consecutive messages of one role collated, `.Messages` templates given
// System / Messages / Response). Standard library only (Debian's golang-go builds it).
//
// ParseFile, parseRuneForState, unquote and the helpers are ported from Ollama's parser/parser.go, and execute /
// collate from its template/template.go (github.com/ollama/ollama, MIT License, Copyright (c) Ollama), with the
// golang.org/x/text BOM reader replaced by a check for a leading BOM and the newer standard library's slices
// replaced by loops. Reads {"modelfile", "dir", "messages"} as JSON on stdin; writes {"commands", "parameters",
// "from_file", "prompt"} or {"error"}.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type Command struct {
	Name string `json:"name"`
	Args string `json:"args"`
}

type Message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"-"`
}

type state int

const (
	stateNil state = iota
	stateName
	stateValue
	stateParameter
	stateMessage
	stateComment
)

var (
	errMissingFrom        = errors.New("no FROM line")
	errInvalidMessageRole = errors.New("message role must be one of \"system\", \"user\", or \"assistant\"")
	errInvalidCommand     = errors.New("command must be one of \"from\", \"license\", \"template\", \"system\", \"adapter\", \"draft\", \"renderer\", \"parser\", \"parameter\", \"message\", or \"requires\"")
)

func ParseFile(r io.Reader) ([]Command, error) {
	var cmd Command
	var curr state
	var currLine int = 1
	var b bytes.Buffer
	var role string
	var commands []Command

	br := bufio.NewReader(r)
	if bom, _ := br.Peek(3); bytes.Equal(bom, []byte{0xEF, 0xBB, 0xBF}) {
		br.Discard(3)
	}

	for {
		r, _, err := br.ReadRune()
		if errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}

		if isNewline(r) {
			currLine++
		}

		next, r, err := parseRuneForState(r, curr)
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: %s", err, b.String())
		} else if err != nil {
			return nil, fmt.Errorf("(line %d): %s", currLine, err.Error())
		}

		if next != curr {
			switch curr {
			case stateName:
				if !isValidCommand(b.String()) {
					return nil, fmt.Errorf("(line %d): %s", currLine, errInvalidCommand.Error())
				}
				switch s := strings.ToLower(b.String()); s {
				case "from":
					cmd.Name = "model"
				case "parameter":
					next = stateParameter
				case "message":
					next = stateMessage
					fallthrough
				default:
					cmd.Name = s
				}
			case stateParameter:
				cmd.Name = b.String()
			case stateMessage:
				if !isValidMessageRole(b.String()) {
					return nil, fmt.Errorf("(line %d): %s", currLine, errInvalidMessageRole.Error())
				}
				role = b.String()
			case stateComment, stateNil:
			case stateValue:
				s, ok := unquote(strings.TrimSpace(b.String()))
				if !ok || isSpace(r) {
					if _, err := b.WriteRune(r); err != nil {
						return nil, err
					}
					continue
				}
				if role != "" {
					s = role + ": " + s
					role = ""
				}
				cmd.Args = s
				commands = append(commands, cmd)
			}
			b.Reset()
			curr = next
		}

		if strconv.IsPrint(r) {
			if _, err := b.WriteRune(r); err != nil {
				return nil, err
			}
		}
	}

	switch curr {
	case stateComment, stateNil:
	case stateValue:
		s, ok := unquote(strings.TrimSpace(b.String()))
		if !ok {
			return nil, io.ErrUnexpectedEOF
		}
		if role != "" {
			s = role + ": " + s
		}
		cmd.Args = s
		commands = append(commands, cmd)
	default:
		return nil, io.ErrUnexpectedEOF
	}

	for _, cmd := range commands {
		if cmd.Name == "model" {
			return commands, nil
		}
	}
	return nil, errMissingFrom
}

func parseRuneForState(r rune, cs state) (state, rune, error) {
	switch cs {
	case stateNil:
		switch {
		case r == '#':
			return stateComment, 0, nil
		case isSpace(r), isNewline(r):
			return stateNil, 0, nil
		default:
			return stateName, r, nil
		}
	case stateName:
		switch {
		case isAlpha(r):
			return stateName, r, nil
		case isSpace(r):
			return stateValue, 0, nil
		default:
			return stateNil, 0, errInvalidCommand
		}
	case stateValue:
		switch {
		case isNewline(r):
			return stateNil, r, nil
		case isSpace(r):
			return stateNil, r, nil
		default:
			return stateValue, r, nil
		}
	case stateParameter:
		switch {
		case isAlpha(r), isNumber(r), r == '_':
			return stateParameter, r, nil
		case isSpace(r):
			return stateValue, 0, nil
		default:
			return stateNil, 0, io.ErrUnexpectedEOF
		}
	case stateMessage:
		switch {
		case isAlpha(r):
			return stateMessage, r, nil
		case isSpace(r):
			return stateValue, 0, nil
		default:
			return stateNil, 0, io.ErrUnexpectedEOF
		}
	case stateComment:
		switch {
		case isNewline(r):
			return stateNil, 0, nil
		default:
			return stateComment, 0, nil
		}
	default:
		return stateNil, 0, errors.New("")
	}
}

func unquote(s string) (string, bool) {
	if len(s) >= 3 && s[:3] == `"""` {
		if len(s) >= 6 && s[len(s)-3:] == `"""` {
			return s[3 : len(s)-3], true
		}
		return "", false
	}
	if len(s) >= 1 && s[0] == '"' {
		if len(s) >= 2 && s[len(s)-1] == '"' {
			return s[1 : len(s)-1], true
		}
		return "", false
	}
	return s, true
}

func isAlpha(r rune) bool   { return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' }
func isNumber(r rune) bool  { return r >= '0' && r <= '9' }
func isSpace(r rune) bool   { return r == ' ' || r == '\t' }
func isNewline(r rune) bool { return r == '\r' || r == '\n' }

func isValidMessageRole(role string) bool {
	return role == "system" || role == "user" || role == "assistant"
}

func isValidCommand(cmd string) bool {
	switch strings.ToLower(cmd) {
	case "from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message", "requires":
		return true
	default:
		return false
	}
}

// The options a PARAMETER may set, with their kinds (api.Options and api.Runner's json tags), as FormatParams
// checks them; deprecated ones are warned about and ignored by Ollama.
var optionKinds = map[string]string{
	"num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "use_mmap": "bool", "num_thread": "int",
	"draft_num_predict": "int", "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float",
	"min_p": "float", "typical_p": "float", "repeat_last_n": "int", "temperature": "float", "repeat_penalty": "float",
	"presence_penalty": "float", "frequency_penalty": "float", "stop": "list",
}

func formatParam(name, value string) (any, error) {
	kind, ok := optionKinds[name]
	if !ok {
		return nil, fmt.Errorf("unknown parameter '%s'", name)
	}
	switch kind {
	case "float":
		v, err := strconv.ParseFloat(value, 32)
		if err != nil {
			return nil, fmt.Errorf("invalid float value [%s]", value)
		}
		return v, nil
	case "int":
		v, err := strconv.ParseInt(value, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("invalid int value [%s]", value)
		}
		return v, nil
	case "bool":
		v, err := strconv.ParseBool(value)
		if err != nil {
			return nil, fmt.Errorf("invalid bool value [%s]", value)
		}
		return v, nil
	}
	return value, nil
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate":      func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate":    func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string { return "any" },
}

// identifiers: the field names a template uses (Ollama's Vars, lower-cased).
func identifiers(n parse.Node, into map[string]bool) {
	switch n := n.(type) {
	case *parse.ListNode:
		if n != nil {
			for _, c := range n.Nodes {
				identifiers(c, into)
			}
		}
	case *parse.ActionNode:
		identifiers(n.Pipe, into)
	case *parse.PipeNode:
		if n != nil {
			for _, c := range n.Cmds {
				identifiers(c, into)
			}
		}
	case *parse.CommandNode:
		for _, a := range n.Args {
			identifiers(a, into)
		}
	case *parse.FieldNode:
		for _, id := range n.Ident {
			into[strings.ToLower(id)] = true
		}
	case *parse.ChainNode:
		identifiers(n.Node, into)
		for _, id := range n.Field {
			into[strings.ToLower(id)] = true
		}
	case *parse.IfNode:
		identifiers(&n.BranchNode, into)
	case *parse.RangeNode:
		identifiers(&n.BranchNode, into)
	case *parse.WithNode:
		identifiers(&n.BranchNode, into)
	case *parse.BranchNode:
		identifiers(n.Pipe, into)
		identifiers(n.List, into)
		identifiers(n.ElseList, into)
	}
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// execute: Ollama's Template.Execute for a chat (no suffix). Templates over .Messages get them whole; older
// templates (.System / .Prompt / .Response) are executed once per exchange, the last one up to its .Response.
func execute(raw string, msgs []Message) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(raw)
	if err != nil {
		return "", err
	}
	vars := map[string]bool{}
	identifiers(tmpl.Tree.Root, vars)
	system, messages := collate(msgs)
	var b bytes.Buffer
	if vars["messages"] {
		err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": messages, "Tools": nil, "Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false})
		return b.String(), err
	}
	if !vars["response"] {
		raw += "{{ .Response }}"
		if tmpl, err = template.New("").Option("missingkey=zero").Funcs(funcs).Parse(raw); err != nil {
			return "", err
		}
	}
	system = ""
	var prompt, response string
	run := func(t *template.Template) error {
		err := t.Execute(&b, map[string]any{"System": system, "Prompt": prompt, "Response": response, "Think": false, "ThinkLevel": "", "IsThinkSet": false})
		system, prompt, response = "", "", ""
		return err
	}
	for _, m := range messages {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := run(tmpl); err != nil {
					return "", err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := run(tmpl); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	// The last exchange: the template up to its {{ .Response }} (the generation prompt).
	cut := strings.Index(raw, "{{ .Response }}")
	if cut < 0 {
		return "", errors.New("this harness cuts legacy templates at the text {{ .Response }} only")
	}
	last, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(raw[:cut])
	if err != nil {
		return "", err
	}
	if err := run(last); err != nil {
		return "", err
	}
	return b.String(), nil
}

type input struct {
	Modelfile string    `json:"modelfile"`
	Dir       string    `json:"dir"`
	Messages  []Message `json:"messages"`
}

func fail(err error) {
	json.NewEncoder(os.Stdout).Encode(map[string]string{"error": err.Error()})
	os.Exit(0)
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail(err)
	}
	commands, err := ParseFile(strings.NewReader(in.Modelfile))
	if err != nil {
		fail(err)
	}
	params := map[string]any{}
	var tmpl, system, from string
	for _, c := range commands {
		switch c.Name {
		case "model":
			from = c.Args
		case "template":
			tmpl = c.Args
		case "system":
			system = c.Args
		case "license", "adapter", "draft", "renderer", "parser", "requires", "message":
		default:
			v, err := formatParam(c.Name, c.Args)
			if err != nil {
				fail(err)
			}
			if optionKinds[c.Name] == "list" {
				list, _ := params[c.Name].([]string)
				params[c.Name] = append(list, v.(string))
			} else {
				params[c.Name] = v
			}
		}
	}
	fromFile := from
	if !filepath.IsAbs(fromFile) {
		fromFile = filepath.Join(in.Dir, fromFile)
	}
	if _, err := os.Stat(fromFile); err != nil {
		fromFile = ""
	}
	msgs := in.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && system != "" {
		msgs = append([]Message{{Role: "system", Content: system}}, msgs...)
	}
	if tmpl == "" {
		tmpl = "{{ .Prompt }}"
	}
	prompt, err := execute(tmpl, msgs)
	if err != nil {
		fail(err)
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"commands": commands, "parameters": params, "from_file": fromFile, "prompt": prompt})
}
