// loadgen: the benchmark's load generator, after vmbench's echo_client.
//
// Why Go: on a 2-core machine the client shares the CPU with the server it measures; a
// compiled client with goroutines costs a fraction of the server's CPU per request, so the
// servers, not the client, set the pace (the report shows this: the same client drives
// Go's own echo server several times faster than any Python server).
//
// Modes:
//
//	echo  -conns N -size S: N connections, one request in flight on each: send S bytes,
//	      read S bytes back, repeat.  Counts and times only requests completed in the
//	      measuring window (after -warmup), whose start and end it prints on stderr
//	      ("MEASURING", "MEASURED"; churn too).
//	churn -conns N -size S: N workers each connect, echo one S-byte message, close, repeat.
//	idle  -conns N: open N connections, echo one byte on each, print "READY N", hold them
//	      until stdin closes, then close them.
//	count -conns N -size S -requests R: N connections echo for -warmup seconds as in echo
//	      mode, then pause (no request in flight), print "READY N" on stderr and wait for a
//	      line on stdin; then each connection echoes exactly R requests, timed as in echo
//	      mode, and the result is printed.  The connections stay open until stdin closes, so
//	      that closing them never falls inside a profiling window the caller opened around
//	      the R requests (benchmarks/servers/callcount.py).
//
// -proxy v1|v2 (any mode): each connection first sends a PROXY protocol header, in a write of
// its own before its first request, as a balancer does (HAProxy's send-proxy/send-proxy-v2,
// nginx's proxy_protocol): the source is the connection's local address, the destination the
// server's.  For servers started with --proxy-protocol (benchmarks/scaleout.py).  -joined
// sends the header in the first request's write instead (one segment for both).
//
// Output: one JSON object on stdout with raw counts and a latency histogram of 10 us buckets
// (sparse [bucket, count] pairs); rates and percentiles are computed in Python
// (benchmarks/stats.py), where they are unit-tested.
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const bucketMicros = 10
const buckets = 1000000 // 10 s

var (
	histogram [buckets + 1]uint64
	requests  uint64
	failures  uint64
	phase     int32 // 0 warm-up, 1 measuring, 2 stopping
	// proxyVersion is -proxy: "" (no header), "v1" or "v2".
	proxyVersion string
	// proxyJoined is -joined: the header goes out in the first request's write.
	proxyJoined bool
)

// v2Signature opens every PROXY protocol v2 header.
var v2Signature = []byte("\r\n\r\n\x00\r\nQUIT\n")

// proxyHeader is the PROXY protocol header a balancer would send on conn: the client is
// conn's local address (this process), the destination the server's.
func proxyHeader(conn net.Conn) []byte {
	src := conn.LocalAddr().(*net.TCPAddr)
	dst := conn.RemoteAddr().(*net.TCPAddr)
	srcIP, dstIP := src.IP.To4(), dst.IP.To4()
	v4 := srcIP != nil && dstIP != nil
	if !v4 {
		srcIP, dstIP = src.IP.To16(), dst.IP.To16()
	}
	if proxyVersion == "v1" {
		family := "TCP4"
		if !v4 {
			family = "TCP6"
		}
		return []byte(fmt.Sprintf("PROXY %s %s %s %d %d\r\n",
			family, src.IP, dst.IP, src.Port, dst.Port))
	}
	// Version 2, command PROXY; TCP over IPv4 (0x11) or IPv6 (0x21); then the addresses,
	// source first, and the ports, all in network order.
	family := byte(0x11)
	if !v4 {
		family = 0x21
	}
	length := 2*len(srcIP) + 4
	header := make([]byte, 0, 16+length)
	header = append(header, v2Signature...)
	header = append(header, 0x21, family, byte(length>>8), byte(length))
	header = append(header, srcIP...)
	header = append(header, dstIP...)
	header = binary.BigEndian.AppendUint16(header, uint16(src.Port))
	header = binary.BigEndian.AppendUint16(header, uint16(dst.Port))
	return header
}

// dial connects to addr and, with -proxy, sends the PROXY header first; with -joined it
// returns the header instead, for the caller to send with its first request (firstWrite).
func dial(addr string, timeout time.Duration) (net.Conn, []byte, error) {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil || proxyVersion == "" {
		return conn, nil, err
	}
	if proxyJoined {
		return conn, proxyHeader(conn), nil
	}
	if _, err = conn.Write(proxyHeader(conn)); err != nil {
		conn.Close()
		return nil, nil, err
	}
	return conn, nil, nil
}

// firstWrite is a connection's first request: data, after the header dial held back.
func firstWrite(conn net.Conn, header, data []byte) error {
	if header != nil {
		data = append(header, data...)
	}
	_, err := conn.Write(data)
	return err
}

func record(start time.Time) {
	if atomic.LoadInt32(&phase) != 1 {
		return
	}
	b := int(time.Since(start).Microseconds() / bucketMicros)
	if b > buckets {
		b = buckets
	}
	atomic.AddUint64(&histogram[b], 1)
	atomic.AddUint64(&requests, 1)
}

func message(size int) []byte {
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = 'x'
	}
	return msg
}

// echoOnce sends msg and reads len(msg) bytes back; a failure is counted.
func echoOnce(conn net.Conn, msg, reply []byte) bool {
	if _, err := conn.Write(msg); err != nil {
		atomic.AddUint64(&failures, 1)
		return false
	}
	if _, err := io.ReadFull(conn, reply); err != nil {
		atomic.AddUint64(&failures, 1)
		return false
	}
	return true
}

func echoWorker(conn net.Conn, size int, wg *sync.WaitGroup) {
	defer wg.Done()
	defer conn.Close()
	msg, reply := message(size), make([]byte, size)
	for atomic.LoadInt32(&phase) < 2 {
		start := time.Now()
		if !echoOnce(conn, msg, reply) {
			return
		}
		record(start)
	}
}

// dialAll opens n connections and echoes one byte on each, so that every connection is
// accepted and served before anything is measured.
func dialAll(addr string, n int) []net.Conn {
	conns := make([]net.Conn, 0, n)
	one := make([]byte, 1)
	for i := 0; i < n; i++ {
		conn, header, err := dial(addr, 60*time.Second)
		if err == nil {
			// A server that accepts but never answers must not hang the run.
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			err = firstWrite(conn, header, one)
		}
		if err == nil {
			_, err = io.ReadFull(conn, one)
		}
		if err != nil {
			atomic.AddUint64(&failures, 1)
			if conn != nil {
				conn.Close()
			}
			continue
		}
		conn.SetDeadline(time.Time{})
		conns = append(conns, conn)
	}
	return conns
}

func cpuSeconds(r syscall.Rusage) float64 {
	return float64(r.Utime.Sec+r.Stime.Sec) + float64(r.Utime.Usec+r.Stime.Usec)/1e6
}

func sparseHistogram() [][2]uint64 {
	sparse := [][2]uint64{}
	for b, count := range histogram {
		if count > 0 {
			sparse = append(sparse, [2]uint64{uint64(b), count})
		}
	}
	return sparse
}

// count: warm up, pause, wait for the go-ahead on stdin, then exactly per requests on each
// connection.
func count(addr string, n, size, per int, warmup float64) {
	conns := dialAll(addr, n)
	var warming int32 = 1
	var paused, done sync.WaitGroup
	start := make(chan struct{})
	for _, conn := range conns {
		paused.Add(1)
		done.Add(1)
		go func(conn net.Conn) {
			defer done.Done()
			msg, reply := message(size), make([]byte, size)
			ok := true
			for ok && atomic.LoadInt32(&warming) == 1 {
				ok = echoOnce(conn, msg, reply)
			}
			paused.Done()
			<-start
			for i := 0; ok && i < per; i++ {
				began := time.Now()
				if ok = echoOnce(conn, msg, reply); ok {
					record(began)
				}
			}
		}(conn)
	}
	time.Sleep(time.Duration(warmup * float64(time.Second)))
	atomic.StoreInt32(&warming, 0)
	paused.Wait()
	fmt.Fprintf(os.Stderr, "READY %d\n", len(conns))
	stdin := bufio.NewReader(os.Stdin)
	stdin.ReadString('\n')
	var before, after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	started := time.Now()
	atomic.StoreInt32(&phase, 1)
	close(start)
	done.Wait()
	elapsed := time.Since(started).Seconds()
	atomic.StoreInt32(&phase, 2)
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"mode": "count", "conns": n, "size": size, "elapsed": elapsed,
		"requests": requests, "failures": failures, "bucket_us": bucketMicros,
		"histogram": sparseHistogram(), "client_cpu_s": cpuSeconds(after) - cpuSeconds(before),
		"requests_per_conn": per, "connections": len(conns),
	})
	io.Copy(io.Discard, stdin) // hold the connections until stdin closes
	for _, conn := range conns {
		conn.Close()
	}
}

func churnWorker(addr string, size int, wg *sync.WaitGroup) {
	// Each churn cycle is one connection: connecting is part of what is measured.
	defer wg.Done()
	msg := make([]byte, size)
	reply := make([]byte, size)
	for atomic.LoadInt32(&phase) < 2 {
		start := time.Now()
		conn, header, err := dial(addr, 0)
		if err != nil {
			atomic.AddUint64(&failures, 1)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		err = firstWrite(conn, header, msg)
		if err == nil {
			_, err = io.ReadFull(conn, reply)
		}
		conn.Close()
		if err != nil {
			atomic.AddUint64(&failures, 1)
			continue
		}
		record(start)
	}
}

func idle(addr string, n int) map[string]interface{} {
	conns := make([]net.Conn, 0, n)
	one := []byte{'x'}
	for i := 0; i < n; i++ {
		conn, header, err := dial(addr, 30*time.Second)
		if err == nil {
			err = firstWrite(conn, header, one)
		}
		if err == nil {
			conn.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, err = io.ReadFull(conn, make([]byte, 1))
		}
		if err != nil {
			failures++
			continue
		}
		conns = append(conns, conn)
	}
	fmt.Fprintf(os.Stderr, "READY %d\n", len(conns))
	io.Copy(io.Discard, bufio.NewReader(os.Stdin)) // hold until stdin closes
	for _, c := range conns {
		c.Close()
	}
	return map[string]interface{}{"mode": "idle", "connections": len(conns), "failures": failures}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:25000", "server address")
	mode := flag.String("mode", "echo", "echo, churn, idle or count")
	conns := flag.Int("conns", 20, "connections (echo, idle) or workers (churn)")
	size := flag.Int("size", 1024, "message size in bytes")
	duration := flag.Float64("duration", 5, "measuring window, seconds")
	warmup := flag.Float64("warmup", 1, "warm-up before measuring, seconds")
	per := flag.Int("requests", 100, "requests per connection (count)")
	flag.StringVar(&proxyVersion, "proxy", "", "send a PROXY protocol header first: v1 or v2")
	flag.BoolVar(&proxyJoined, "joined", false, "with -proxy: header and first request in one write")
	flag.Parse()
	if proxyVersion != "" && proxyVersion != "v1" && proxyVersion != "v2" {
		fmt.Fprintf(os.Stderr, "-proxy must be v1 or v2, got %q\n", proxyVersion)
		os.Exit(2)
	}

	if *mode == "idle" {
		json.NewEncoder(os.Stdout).Encode(idle(*addr, *conns))
		return
	}
	if *mode == "count" {
		count(*addr, *conns, *size, *per, *warmup)
		return
	}
	var wg sync.WaitGroup
	var open []net.Conn
	if *mode == "churn" {
		for i := 0; i < *conns; i++ {
			wg.Add(1)
			go churnWorker(*addr, *size, &wg)
		}
	} else {
		// Every connection is open and has been echoed once before the warm-up starts, so
		// the measured window is steady state, not the server's accept backlog.
		open = dialAll(*addr, *conns)
		for _, conn := range open {
			wg.Add(1)
			go echoWorker(conn, *size, &wg)
		}
	}
	time.Sleep(time.Duration(*warmup * float64(time.Second)))
	var before syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	// The window's edges on stderr, for a caller that samples the server's CPU time over
	// exactly the window (benchmarks/scaleout.py).
	fmt.Fprintln(os.Stderr, "MEASURING")
	started := time.Now()
	atomic.StoreInt32(&phase, 1)
	time.Sleep(time.Duration(*duration * float64(time.Second)))
	atomic.StoreInt32(&phase, 2)
	elapsed := time.Since(started).Seconds()
	fmt.Fprintln(os.Stderr, "MEASURED")
	var after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	// A request still unanswered 10 s after the window (a server that stopped answering)
	// fails instead of hanging the run.
	for _, conn := range open {
		conn.SetDeadline(time.Now().Add(10 * time.Second))
	}
	wg.Wait()
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"mode": *mode, "conns": *conns, "size": *size, "elapsed": elapsed,
		"requests": requests, "failures": failures, "bucket_us": bucketMicros,
		"histogram": sparseHistogram(), "client_cpu_s": cpuSeconds(after) - cpuSeconds(before),
	})
}
