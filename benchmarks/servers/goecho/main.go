// goecho: Go's plain net echo, vmbench's goecho with a -addr flag; built for Linux and,
// with GOOS=windows, for Windows (where Go's runtime uses IOCP itself).
package main

import (
	"flag"
	"fmt"
	"net"
)

func serve(conn net.Conn) {
	defer conn.Close()
	buf := make([]byte, 102400)
	for {
		n, err := conn.Read(buf)
		if err != nil || n == 0 {
			return
		}
		if _, err := conn.Write(buf[:n]); err != nil {
			return
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:25000", "address to listen on")
	flag.Parse()
	listener, err := net.Listen("tcp", *addr)
	if err != nil {
		panic(err)
	}
	fmt.Println("READY", listener.Addr())
	for {
		conn, err := listener.Accept()
		if err != nil {
			continue
		}
		go serve(conn)
	}
}
